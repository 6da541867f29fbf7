"""One decision for the device and the precision, shared by training, evaluation, bench and torchrun."""
import platform

import pytest
import torch

from runtime import distributed, precision
from runtime.device import resolve_device
from runtime.precision import autocast_dtype, cpu_has_fast_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision, amp, expected", [
    ("fp32", True, None), ("auto", False, None), ("bf16", True, torch.bfloat16), ("fp16", True, torch.float16),
])
def test_autocast_dtype_on_cpu(precision, amp, expected):
    assert autocast_dtype(CPU, amp, precision) == expected


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_is_bf16_only_where_bf16_is_native(monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    assert autocast_dtype(CPU, True, "auto") == (torch.bfloat16 if fast else None)


def test_the_bf16_probe_agrees_with_the_cpu_flags():
    """Read independently from /proc/cpuinfo: native bf16 (AVX-512 BF16 or AMX) must be found, and an
    x86 CPU without any AVX-512 (bf16 emulated, many times slower) must not pass for one."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads the flags of an x86 CPU")
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert cpu_has_fast_bf16()
    elif not any(flag.startswith("avx512") for flag in flags):
        assert not cpu_has_fast_bf16()
    else:
        pytest.skip("AVX-512 without native bf16: whether oneDNN counts it as fast is its own choice")


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="train.precision"):
        autocast_dtype(CPU, True, "fp8")


def test_distributed_init_takes_the_device_precision_decides(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("auto", "cpu"):
        assert distributed.init_from_env(name) == resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_missing_cuda_is_one_error_in_both_places(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError) as direct:
        resolve_device("cuda")
    with pytest.raises(RuntimeError) as via_init:
        distributed.init_from_env("cuda")
    assert str(direct.value) == str(via_init.value) and "--train.device cpu" in str(direct.value)
