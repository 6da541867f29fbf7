"""In what precision a step or a prediction runs: the one place that decides the autocast dtype.

Training, evaluation, inference and the benchmarks all ask here, so a run and an evaluation of its
checkpoint make the same choice. The device and the model's fast paths are chosen in runtime/device.py.
"""
import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device, amp, precision="auto"):
    """The autocast dtype of a training step or a prediction; None runs plain fp32.

    "auto": bf16 on GPUs that have it, else fp16 (with a loss scaler); on CPU bf16 only where
    oneDNN runs it natively (AVX-512/AMX): on an AVX2-only CPU bf16 is emulated and a step is many
    times slower than fp32 (docs/performance.md), so there "auto" is fp32. amp False means fp32 everywhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision {precision!r}: choose one of {PRECISIONS}")
    if not amp or precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def cpu_has_fast_bf16():
    """Whether oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device, amp_dtype):
    """Mixed precision in `amp_dtype` on `device`, or plain fp32 when it is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
