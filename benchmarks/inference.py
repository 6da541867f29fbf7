"""bench.py's inference figures: one scan predicted as evaluate.py predicts it, and against MONAI's
sliding_window_inference. The scan is a user's (bench_scan: a brain in zeros), so cropping to the
brain (eval.crop_nonzero) counts, as it does for a real one."""
import copy

import torch

from benchmarks.timing import interleaved, peak_mib, reset_peak
from cases.geometry import brain_box
from evaluation.inference import model_predictor, predict_patches, sliding_window, window_starts, windows_per_pass
from model import build_model
from runtime.precision import autocast, autocast_dtype
from transforms.normalise import zscore_brain

# The median brain box of the ten real BraTS cases here: 171 x 138 x 137 voxels of 240 x 240 x 155
BRAIN_EXTENT = (0.71, 0.58, 0.88)


def bench_scan(channels, case_shape, seed=0):
    """A scan as a user holds it: noise inside a centred ellipsoid spanning BRAIN_EXTENT of each
    axis, zeros around it (what predict_patches crops away)."""
    gen = torch.Generator().manual_seed(seed)
    axes = [(torch.arange(n) - (n - 1) / 2) / (n * e / 2) for n, e in zip(case_shape, BRAIN_EXTENT)]
    radius = sum(a.view([-1 if i == j else 1 for j in range(len(axes))]) ** 2 for i, a in enumerate(axes))
    return torch.randn(channels, *case_shape, generator=gen) * (radius <= 1) + (radius <= 1) * 3.0


def count_windows(shape, window, overlap):
    n = 1
    for s, w in zip(shape, window):
        n *= len(window_starts(max(s, w), w, overlap))
    return n


def predicted_shape(cfg, scan):
    """The spatial shape predict_patches slides its window over: the non-zero box when cropping."""
    box = brain_box(scan.numpy()) if cfg.eval.crop_nonzero else None
    return tuple(scan.shape[1:]) if box is None else tuple(stop - start for start, stop in box)


def bench_inference(cfg, device, case_shape, repeats, crop=None):
    """Seconds to predict one scan (bench_scan; evaluation.inference.predict_patches: crop, normalise, window,
    sigmoid), without and with mirror TTA. With a `crop` size, both are timed as a sliding window
    over a crop of the brain and scaled by the count of windows the whole prediction takes."""
    mc, ev, tc = cfg.model, cfg.eval, cfg.train
    window, per_pass = tuple(cfg.data.patch_size), windows_per_pass(ev, device)
    model = build_model(mc).to(device).eval()  # as evaluate.py runs it
    amp_dtype = autocast_dtype(device, tc.amp, tc.precision)
    predictor = model_predictor(model, device, amp_dtype)
    scan, spacing = bench_scan(mc.in_channels, case_shape), (1.0,) * len(case_shape)
    windows = count_windows(predicted_shape(cfg, scan), window, ev.overlap)
    reset_peak(device)
    if crop is None:
        def predict(mirror):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.eval.mirror = mirror
            return lambda: predict_patches(model, scan, run_cfg, device, amp_dtype, spacing)
        times = {m: interleaved({"case": predict(m)}, device, repeats if not m else 1, warmup=0)["case"]
                 for m in (False, True)}
    else:
        centre = tuple(slice(max(0, (n - c) // 2), max(0, (n - c) // 2) + c) for n, c in zip(case_shape, crop))
        image = scan[(slice(None), *centre)]
        scale = windows / count_windows(image.shape[1:], window, ev.overlap)
        times = {m: interleaved({"case": lambda m=m: sliding_window(predictor, image, window, ev.overlap, per_pass,
                                                                    gaussian=ev.gaussian, mirror=m, device=device)},
                                device, repeats if not m else 1, warmup=0)["case"] * scale for m in (False, True)}
    return {"infer_case_s": times[False], "infer_case_mirror_s": times[True], "infer_windows": windows,
            "infer_windows_whole_scan": count_windows(case_shape, window, ev.overlap),
            "infer_windows_per_pass": per_pass, "infer_estimated": crop is not None, "infer_peak_mib": peak_mib(device)}


def compare_monai_inference(cfg, device, case_shape, repeats):
    """Two ratios of our time over MONAI's: `vs_monai_infer`, one scan as each pipeline predicts it
    (ours: predict_patches, which crops to the brain, normalises and takes the sigmoid; theirs: the
    whole normalised scan), and `vs_monai_windows`, the same windows over the same whole array
    (the sliding window alone). Both run the same plain model, precision and windows per pass."""
    from monai.inferers import sliding_window_inference
    mc, ev = cfg.model, cfg.eval
    amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    window, per_pass = tuple(cfg.data.patch_size), windows_per_pass(ev, device)
    scan = bench_scan(mc.in_channels, case_shape)
    image, spacing = zscore_brain(scan), (1.0,) * len(case_shape)
    plain = build_model(mc).to(device).eval()
    predictor = model_predictor(plain, device, amp_dtype)

    def theirs():
        with torch.no_grad(), autocast(device, amp_dtype):
            return sliding_window_inference(image[None].to(device), window, per_pass, plain,
                                            overlap=ev.overlap, mode="gaussian" if ev.gaussian else "constant")
    infer = interleaved({"ours": lambda: predict_patches(plain, scan, cfg, device, amp_dtype, spacing),
                         "windows": lambda: sliding_window(predictor, image, window, ev.overlap, per_pass,
                                                           gaussian=ev.gaussian, device=device),
                         "monai": theirs}, device, repeats, warmup=0)
    return {"monai_infer_s": infer["monai"], "monai_infer_ours_s": infer["ours"],
            "vs_monai_infer": infer["ours"] / infer["monai"], "monai_windows_ours_s": infer["windows"],
            "vs_monai_windows": infer["windows"] / infer["monai"], "monai_case_shape": list(case_shape),
            "monai_crop_nonzero": ev.crop_nonzero}
