"""Where a step or a prediction runs and in what precision: the one place that decides the device,
the autocast dtype and the fast paths (channels-last memory layout, torch.compile).

train, evaluate, bench, inference and distributed all ask here, so a run and an evaluation of its
checkpoint make the same choice, and the error for a missing GPU is written once.
"""
import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device, amp, precision="auto"):
    """The autocast dtype of a training step or a prediction; None runs plain fp32.

    "auto": bf16 on GPUs that have it, else fp16 (with a loss scaler); on CPU bf16 only where
    oneDNN runs it natively (AVX-512/AMX): on an AVX2-only CPU a bf16 step measured 40x slower
    than fp32, so there "auto" is fp32. amp False means fp32 everywhere.
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
