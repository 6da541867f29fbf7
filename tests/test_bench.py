"""The benchmark runs end to end at tiny sizes, and every fast path computes what the plain path does."""
import copy
import json

import pytest
import torch

import bench
from benchmarks import profiling as bench_profile
from benchmarks import timing as bench_machine
from config import Config, ModelConfig
from evaluation.inference import model_predictor, sliding_window
from model import InstanceNorm, UNet
from runtime.device import prepare_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Two OMP threads on a shared 2-core machine can be 40x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**train):
    cfg = Config()
    cfg.model = ModelConfig(base_channels=4, depth=2)
    cfg.data.image_size, cfg.data.patch_size, cfg.eval.sw_batch_size = (16, 16, 16), (16, 16, 16), 2
    cfg.train.batch_size = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def two_steps(model, batch, cfg=None):
    """Loss of two training steps (bench.make_step: train_step itself) and the weights after them."""
    step = bench.make_step(cfg or tiny_cfg(precision="fp32", lr=1e-4), model, batch, CPU)
    losses = [step() for _ in range(2)]
    return losses, [p.detach().clone() for p in model.parameters()]


def test_channels_last_trains_like_the_plain_layout():
    torch.manual_seed(0)
    plain = UNet(4, 3, base_channels=4, depth=2)
    fast = prepare_model(copy.deepcopy(plain), tiny_cfg(channels_last=True).train, CPU)
    assert next(fast.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    batch = bench.random_batch(2, 4, (16, 12, 16), 3, CPU)
    (loss_a, weights_a), (loss_b, weights_b) = two_steps(plain, batch), two_steps(fast, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for a, b in zip(weights_a, weights_b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_bf16_autocast_step_stays_close_to_fp32():
    torch.manual_seed(0)
    plain = UNet(4, 3, base_channels=4, depth=1)
    batch = bench.random_batch(1, 4, (8, 8, 8), 3, CPU)
    loss_a, _ = two_steps(plain, batch)
    loss_b, _ = two_steps(copy.deepcopy(plain), batch, tiny_cfg(precision="bf16", lr=1e-4))
    assert loss_b[0] == pytest.approx(loss_a[0], rel=0.02)


def test_fast_sliding_window_matches_the_plain_one():
    torch.manual_seed(0)
    plain = UNet(4, 3, base_channels=4, depth=2).eval()
    fast = prepare_model(copy.deepcopy(plain), tiny_cfg(channels_last=True).train, CPU)
    image = torch.randn(4, 20, 18, 24)
    expected = sliding_window(model_predictor(plain, CPU), image, (16, 16, 16), 0.5, 2)
    torch.testing.assert_close(sliding_window(model_predictor(fast, CPU), image, (16, 16, 16), 0.5, 3), expected,
                               atol=1e-4, rtol=1e-4)


def test_benchmark_runs_end_to_end(tmp_path):
    cfg = tiny_cfg(channels_last=True)
    out = bench.run_benchmarks(cfg, CPU, quick=True, with_monai=False, case_shape=(20, 24, 18), sides=(16,),
                               case_sizes=(16, 20), crop=16)
    for key in ("matmul_gflops", "copy_gbps", "step_s", "step_gflops", "step_frac_of_ceiling",
                "step_frac_of_fp32_ceiling", "voxels_per_s",
                "loader_samples_per_s", "loader_over_step", "infer_case_s", "infer_case_mirror_s", "peak_rss_mib"):
        assert out[key] > 0, key
    assert [s["size"] for s in out["steps"]] == [[16, 16, 16], [16, 16, 16]]
    assert out["steps"][0]["step_flops"] > 0
    assert "GFLOP/s" in bench.format_bench_table(out)
    json.dumps(out)  # everything in it can be written to bench.json


def test_monai_comparison_runs_when_monai_is_installed():
    pytest.importorskip("monai")
    cfg = tiny_cfg()
    dyn = bench.monai_dynunet(cfg.model)
    assert dyn(torch.randn(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    out = bench.compare_monai(cfg, CPU, 1, (16, 16, 16), (20, 16, 16), repeats=1)
    assert out["vs_monai_step"] > 0 and out["vs_monai_infer"] > 0 and out["vs_monai_windows"] > 0


def test_the_bench_scan_is_a_brain_in_zeros_whose_box_is_what_is_predicted():
    from benchmarks import inference as bench_infer
    scan = bench_infer.bench_scan(4, (240, 240, 155))
    cfg = tiny_cfg()
    box = bench_infer.predicted_shape(cfg, scan)
    for side, whole, share in zip(box, (240, 240, 155), bench_infer.BRAIN_EXTENT):
        assert abs(side - whole * share) <= 2
    assert float(scan[:, 0, 0, 0].abs().max()) == 0
    cfg.eval.crop_nonzero = False
    assert bench_infer.predicted_shape(cfg, scan) == (240, 240, 155)
    assert bench_infer.count_windows(box, (64, 64, 64), 0.5) < bench_infer.count_windows((240, 240, 155), (64, 64, 64), 0.5) / 2


@pytest.mark.parametrize("batch,layout", [(1, torch.contiguous_format), (2, torch.channels_last_3d)])
def test_instance_norm_computes_what_torch_instance_norm_computes(batch, layout):
    """model.InstanceNorm (per-sample batch norm, layout kept) against nn.InstanceNorm3d, values and gradients."""
    torch.manual_seed(0)
    ours, theirs = InstanceNorm(5), torch.nn.InstanceNorm3d(5, affine=True)
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.uniform_(0.5, 1.5)
        theirs.load_state_dict(ours.state_dict())  # same parameter names
    x = (torch.randn(batch, 5, 6, 7, 5) * 3 + 1).contiguous(memory_format=layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(xa)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, theirs(xb), atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad), theirs(xb).backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)


def test_bf16_sliding_window_stays_close_to_fp32():
    torch.manual_seed(0)
    model = UNet(4, 3, base_channels=4, depth=2).eval()
    image = torch.randn(4, 20, 18, 24)
    fp32 = sliding_window(model_predictor(model, CPU), image, (16, 16, 16), 0.5, 2)
    bf16 = sliding_window(model_predictor(model, CPU, torch.bfloat16), image, (16, 16, 16), 0.5, 2)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05 * fp32.abs().max().item(), rtol=0.05)


def test_profile_shares_cover_the_step_and_name_each_kind():
    cfg = tiny_cfg(precision="fp32")
    rows = bench_profile.profile_steps(cfg, CPU, (16,), (None,), bench.profiled_step(CPU))
    shares = {kind: rows[0][kind] for kind in bench_profile.KINDS}
    assert sum(shares.values()) == pytest.approx(1)
    assert shares["convolutions"] > 0 and shares["loss"] > 0 and shares["optimizer"] > 0
    assert "convolution" in bench_profile.format_profile(rows)


@pytest.mark.parametrize("name,kind", [("aten::mkldnn_convolution", "convolutions"),
                                       ("autograd::engine::evaluate_function: NativeBatchNormBackward0", "norms"),
                                       ("aten::leaky_relu_", "activations"), ("aten::cat", "copies/conversions"),
                                       ("Optimizer.step#Adam.step", "optimizer"), ("aten::empty", None)])
def test_operator_names_map_to_their_kind(name, kind):
    assert bench_profile.kind_of(name) == kind


def test_step_fraction_is_of_the_ceiling_of_its_precision():
    ceiling = {"matmul_gflops": 100.0, "matmul_bf16_gflops": 400.0}
    bf16 = bench_machine.ceiling_fractions(200.0, ceiling, torch.bfloat16)
    assert bf16["step_frac_of_ceiling"] == 0.5 and bf16["step_frac_of_fp32_ceiling"] == 2.0
    assert bench_machine.ceiling_fractions(50.0, ceiling, None)["step_frac_of_ceiling"] == 0.5
    # bf16 emulated (no bf16 ceiling measured): fall back to the fp32 ceiling rather than fail
    assert bench_machine.ceiling_fractions(50.0, {"matmul_gflops": 100.0}, torch.bfloat16)["step_frac_of_ceiling"] == 0.5
