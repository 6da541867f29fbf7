"""How fast we are, measured against the machine's own ceiling and against MONAI, in one run.

    python bench.py [--quick] [--device cpu|cuda] [--compare-monai] [--profile] [--out bench.json]
                    [--section.key VALUE ...]

Prints a table and writes bench.json (step_frac_of_ceiling: share of the ceiling of the step's own
precision; docs/performance.md lists the keys). --profile prints instead where the step's time
goes, by operator kind (benchmarks/profiling.py). Every figure is a median over repeats after warm-up; where
two things are compared (ours and MONAI, a fast path on and off) they run interleaved, A B A B,
so a shared machine's load drifts over both alike. Config overrides (e.g. --train.precision fp32)
choose what "ours" runs, exactly as main.py would train it.
`python bench.py --accuracy --data.dir DIR --train.max_minutes 25` measures accuracy instead:
recipes trained for the same budget and scored on held-out real cases (benchmarks/accuracy.py).
`python bench.py --2d --preset lgg2d --data.dir DIR` times a 2D epoch's parts instead (benchmarks/bench2d.py).
"""
import argparse
import copy
import json
import tempfile
import time

import torch

from benchmarks.inference import bench_inference, compare_monai_inference
from benchmarks.profiling import format_profile, labelled_loss, profile_steps
from benchmarks.timing import (
    allocator_settings,
    bf16_supported,
    ceiling_fractions,
    ceilings,
    interleaved,
    peak_mib,
    reset_peak,
)
from config import build_config, check
from dataset import build_dataset
from losses import DiceBCELoss
from model import build_model
from overrides import split_args
from runtime.atomic import write_text
from runtime.device import prepare_model, resolve_device
from runtime.precision import autocast_dtype
from training.loaders import loader_workers, make_loader
from training.step import make_run, train_step

# --- the training step ------------------------------------------------------------------------------------

def make_step(cfg, model, batch, device, label_loss=False):
    """The training step itself (training/step.train_step: autocast, loss, backward, unscale, clipping, NaN
    guard, Adam step) on a fixed batch, with the optimizer and precision `cfg` gives a run.
    label_loss: the loss's forward under a profiler label (benchmarks/profiling.py)."""
    loss = DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight)
    run = make_run(cfg, model, labelled_loss(loss) if label_loss else loss, device)
    return lambda: train_step(run, batch)


def random_batch(batch_size, channels, size, out_channels, device):
    """A batch as the loader serves it: {"image", "target"}."""
    image = torch.randn(batch_size, channels, *size, device=device)
    target = (torch.rand(batch_size, out_channels, *size, device=device) > 0.7).float()
    return {"image": image, "target": target}


def step_flops(model, batch):
    """FLOPs of forward + backward, by torch's FLOP counter (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        DiceBCELoss()(model(batch["image"]), batch["target"]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_step(cfg, device, batch_size, size, *, repeats, ceiling, warmup=1):
    """Seconds, FLOPs, GFLOP/s and its share of the ceilings (benchmarks.timing.ceiling_fractions),
    voxels/s and peak memory of our step."""
    mc, tc = cfg.model, cfg.train
    model = build_model(mc).to(device)
    batch = random_batch(batch_size, mc.in_channels, size, mc.out_channels, device)
    flops = step_flops(model, batch)
    model = prepare_model(model, tc, device)
    step = make_step(cfg, model, batch, device)
    reset_peak(device)
    seconds = interleaved({"step": step}, device, repeats, warmup)["step"]
    voxels = batch_size * torch.Size(size).numel()
    amp_dtype = autocast_dtype(device, tc.amp, tc.precision)
    return {"size": list(size), "batch": batch_size, "step_s": seconds, "step_flops": flops,
            "step_gflops": flops / seconds / 1e9, **ceiling_fractions(flops / seconds / 1e9, ceiling, amp_dtype),
            "voxels_per_s": voxels / seconds, "peak_mib": peak_mib(device)}


# --- the data loader --------------------------------------------------------------------------------------

def bench_loader(cfg, device, n_cases, epochs, case_sizes=(72, 104)):
    """Training samples per second of the configured loader alone (default workers), warm cache."""
    from cases.synthetic import generate_dataset
    with tempfile.TemporaryDirectory() as folder:
        paths = generate_dataset(folder, n_cases, seed=0, min_size=case_sizes[0], max_size=case_sizes[1])
        train_set = build_dataset(cfg.data, paths)
        workers = loader_workers(cfg.data.num_workers, device)
        loader = make_loader(train_set, cfg.train.batch_size, num_workers=workers,
                             pin_memory=device.type == "cuda")
        for _ in loader:  # first epoch: reads, normalises and caches the cases
            pass
        start, samples = time.perf_counter(), 0
        for epoch in range(epochs):
            train_set.set_epoch(epoch + 1)
            for batch in loader:
                samples += batch["image"].shape[0]
        return {"loader_samples_per_s": samples / (time.perf_counter() - start), "loader_workers": workers}


# --- MONAI, side by side ----------------------------------------------------------------------------------

def monai_dynunet(mc):
    """MONAI's DynUNet configured like our UNet: same widths, depth, 3x3x3 kernels, strided
    downsampling, transposed-conv upsampling, instance norm, LeakyReLU, no residuals, one head."""
    from monai.networks.nets import DynUNet
    widths = [min(mc.base_channels * 2 ** i, mc.max_channels) for i in range(mc.depth + 1)]
    return DynUNet(3, mc.in_channels, mc.out_channels, kernel_size=[3] * (mc.depth + 1),
                   strides=[1] + [2] * mc.depth, upsample_kernel_size=[2] * mc.depth, filters=widths,
                   norm_name=("instance", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01}),
                   res_block=False, deep_supervision=False)


def compare_monai(cfg, device, batch_size, size, case_shape, repeats):
    """Our step against DynUNet's and our prediction against MONAI's sliding_window_inference
    (benchmarks.inference.compare_monai_inference), interleaved; the ratios are our time over theirs (below
    1: we are faster)."""
    mc = cfg.model
    batch = random_batch(batch_size, mc.in_channels, size, mc.out_channels, device)
    ours = prepare_model(build_model(mc).to(device), cfg.train, device)
    steps = interleaved({"ours": make_step(cfg, ours, batch, device),
                         "monai": make_step(cfg, monai_dynunet(mc).to(device), batch, device)},
                        device, repeats)
    return {"monai_step_s": steps["monai"], "monai_step_ours_s": steps["ours"],
            "vs_monai_step": steps["ours"] / steps["monai"],
            **compare_monai_inference(cfg, device, case_shape, repeats)}


# --- the profile (benchmarks/profiling.py) ------------------------------------------------------------------------

PROFILE_SIDES = {False: (64, 96, 128), True: (32, 48, 64)}  # --profile, --profile --quick


def profile_dtypes(device):
    """fp32, and bf16 where it is native (emulated bf16 is not worth profiling)."""
    return (None, torch.bfloat16) if bf16_supported(device) else (None,)


def profiled_step(device):
    """make_step(cfg, side, amp_dtype) for benchmarks.profiling: the real step, batch 1, loss labelled."""
    def make(cfg, side, amp_dtype):
        cfg = copy.deepcopy(cfg)
        cfg.train.precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
        model = prepare_model(build_model(cfg.model).to(device), cfg.train, device)
        batch = random_batch(1, cfg.model.in_channels, (side,) * 3, cfg.model.out_channels, device)
        return make_step(cfg, model, batch, device, label_loss=True)
    return make


# --- the whole run ----------------------------------------------------------------------------------------

def run_benchmarks(cfg, device, *, quick, with_monai, case_shape, sides=(96, 128), case_sizes=(72, 104),
                   crop=96):
    """Every figure, as a dict (bench.json); `sides`, `case_sizes` and `crop` shrink it for tests.
    Quick: fewer repeats, and inference timed on a crop of the case and scaled by windows."""
    repeats = 2 if quick else 5
    amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    out = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "precision": str(amp_dtype or torch.float32), "channels_last": cfg.train.channels_last,
           "compile": cfg.train.compile, "allocator": allocator_settings(), "quick": quick}
    ceiling = ceilings(device, quick, repeats + 1, amp_dtype)
    out.update(ceiling)
    default = tuple(cfg.data.image_size if cfg.data.mode == "resize" else cfg.data.patch_size)
    out["steps"] = [bench_step(cfg, device, cfg.train.batch_size, default, repeats=repeats, ceiling=ceiling)]
    warmup = 0 if quick and not cfg.train.compile else 1  # a compiled first step is mostly its compile
    for side in sides:  # quick: one step, no warm-up (the first step's allocations count)
        out["steps"].append(bench_step(cfg, device, 1, (side,) * 3, repeats=1 if quick else 3, ceiling=ceiling,
                                       warmup=warmup))
    out.update({k: v for k, v in out["steps"][0].items() if k.startswith(("step_", "voxels_per_s"))})
    out["peak_rss_mib"] = max(s["peak_mib"] for s in out["steps"])
    out.update(bench_loader(cfg, device, 6 if quick else 16, 2 if quick else 4, case_sizes))
    out["loader_over_step"] = out["loader_samples_per_s"] / (cfg.train.batch_size / out["step_s"])
    out.update(bench_inference(cfg, device, case_shape, 1 if quick else 2, (crop,) * 3 if quick else None))
    if with_monai:
        try:
            out.update(compare_monai(cfg, device, cfg.train.batch_size, default, case_shape, repeats))
        except ImportError:
            out["monai"] = "not installed: pip install -r requirements-bench.txt"
    return out


def format_bench_table(out):
    lines = [f"device {out['device']}, {out['threads']} threads, torch {out['torch']}, {out['precision']}, "
             f"channels_last {out['channels_last']}, compile {out['compile']}, "
             f"allocator {out['allocator'] or 'glibc defaults'}",
             f"ceiling: fp32 matmul {out['matmul_gflops']:.0f} GFLOP/s"
             + (f", bf16 {out['matmul_bf16_gflops']:.0f}" if "matmul_bf16_gflops" in out else "")
             + f", memory copy {out['copy_gbps']:.1f} GB/s",
             f"{'step':<16}{'seconds':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'ceiling':>9}{'(fp32)':>8}{'Mvox/s':>9}"
             f"{'peak MiB':>10}"]
    for s in out["steps"]:
        name = f"{'x'.join(map(str, s['size']))} b{s['batch']}"
        lines.append(f"{name:<16}{s['step_s']:>9.3f}{s['step_flops'] / 1e9:>9.1f}{s['step_gflops']:>9.1f}"
                     f"{s['step_frac_of_ceiling']:>9.0%}{s['step_frac_of_fp32_ceiling']:>8.0%}"
                     f"{s['voxels_per_s'] / 1e6:>9.2f}{s['peak_mib']:>10.0f}")
    lines.append(f"loader: {out['loader_samples_per_s']:.1f} samples/s with {out['loader_workers']} workers, "
                 f"{out['loader_over_step']:.1f}x the step's sample rate")
    lines.append(f"inference, {out['infer_windows']} windows (the whole scan: {out['infer_windows_whole_scan']}), "
                 f"{out['infer_windows_per_pass']} per pass: {out['infer_case_s']:.1f} s, with mirror TTA "
                 f"{out['infer_case_mirror_s']:.1f} s{' (scaled from a crop)' if out['infer_estimated'] else ''}"
                 f", peak {out['infer_peak_mib']:.0f} MiB")
    if "vs_monai_step" in out:
        lines.append(f"vs MONAI (ours / theirs): step {out['vs_monai_step']:.2f} "
                     f"({out['monai_step_ours_s']:.3f} s / {out['monai_step_s']:.3f} s), scan "
                     f"{out['vs_monai_infer']:.2f} ({out['monai_infer_ours_s']:.1f} s / {out['monai_infer_s']:.1f} s), "
                     f"same windows {out['vs_monai_windows']:.2f} ({out['monai_windows_ours_s']:.1f} s)")
    elif "monai" in out:
        lines.append(f"MONAI: {out['monai']}")
    return "\n".join(lines)


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if "--accuracy" in argv:  # trains and evaluates recipes: a benchmark of its own, benchmarks/accuracy.py
        from benchmarks import accuracy
        return accuracy.main([arg for arg in argv if arg != "--accuracy"])
    if "--2d" in argv:  # where a 2D epoch's time goes, on real cases: benchmarks/bench2d.py
        from benchmarks import bench2d
        return bench2d.main([arg for arg in argv if arg != "--2d"])
    pairs, rest = split_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, inference timed on a crop (< 3 min on 2 cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compare-monai", action="store_true", help="time MONAI's DynUNet and sliding window too")
    parser.add_argument("--case-shape", default="240,240,155", help="whole case for inference (D,H,W)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="operator-kind shares of the step (benchmarks/profiling.py)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--2d", action="store_true", dest="slices_2d",
                        help="time a 2D epoch's parts on real cases instead (benchmarks/bench2d.py; see --2d --help)")
    parser.add_argument("--accuracy", action="store_true",
                        help="measure accuracy instead: train recipes for --train.max_minutes and score held-out "
                             "cases (benchmarks/accuracy.py; its flags: --recipe, --folds, --work, --out; see --accuracy --help)")
    args = parser.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = check(build_config(pairs))
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.profile:
        rows = profile_steps(cfg, device, PROFILE_SIDES[args.quick], profile_dtypes(device), profiled_step(device))
        print(format_profile(rows))
        out = {"profile": rows}
    else:
        out = run_benchmarks(cfg, device, quick=args.quick, with_monai=args.compare_monai,
                             case_shape=tuple(int(v) for v in args.case_shape.split(",")))
        print(format_bench_table(out))
    write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
