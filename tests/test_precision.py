"""One decision for the device and the precision, shared by training, evaluation, bench and torchrun."""
import pytest
import torch

from runtime import distributed
from runtime.device import resolve_device
from runtime.precision import autocast_dtype, cpu_has_fast_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision, amp, expected", [
    ("fp32", True, None), ("auto", False, None), ("bf16", True, torch.bfloat16), ("fp16", True, torch.float16),
    ("auto", True, torch.bfloat16 if cpu_has_fast_bf16() else None),
])
def test_autocast_dtype_on_cpu(precision, amp, expected):
    assert autocast_dtype(CPU, amp, precision) == expected


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="train.precision"):
        autocast_dtype(CPU, True, "fp8")


def test_distributed_init_takes_the_device_precision_decides(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("auto", "cpu"):
        assert distributed.init_from_env(name).device == resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_missing_cuda_is_one_error_in_both_places(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError) as direct:
        resolve_device("cuda")
    with pytest.raises(RuntimeError) as via_init:
        distributed.init_from_env("cuda")
    assert str(direct.value) == str(via_init.value) and "--train.device cpu" in str(direct.value)
