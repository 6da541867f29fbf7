"""Where a step or a prediction runs and in what precision: the one place that decides the device,
the autocast dtype and the fast paths (channels-last memory layout, torch.compile).

train, evaluate, bench, inference and distributed all ask here, so a run and an evaluation of its
checkpoint make the same choice, and the error for a missing GPU is written once.
"""
import torch

from checkpoint import unwrap

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name):
    """The device of train.device: "auto" takes CUDA when available. Under torchrun
    distributed.init_from_env pins each process to its GPU, so "cuda" means that one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


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


def prepare_model(model, train_cfg, device):
    """The model as a step and a prediction run it: channels-last memory layout (train.channels_last)
    and torch.compile (train.compile). Same code on CPU and CUDA; checkpoint.unwrap undoes compile."""
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d if unwrap(model).dims == 3 else torch.channels_last)
    if train_cfg.compile:
        model = torch.compile(model)
    return model
