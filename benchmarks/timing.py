"""The machine side of bench.py: timing (medians, interleaved A B A B), peak memory, the ceilings.

The ceilings are what the hardware does on the easiest work there is: a large matmul in fp32 and,
where the CPU or GPU has native bf16, in bf16, and a large memory copy. A step's share of the
ceiling of the precision it runs in says how much of the machine it uses.
"""
import os
import statistics

import torch

from runtime.precision import cpu_has_fast_bf16
from runtime.timing import timed

ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")


def interleaved(fns, device, repeats, warmup=1):
    """{name: median seconds}, running the callables in turn (A B A B ...) after `warmup` rounds each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device=device)[1])
    return {name: statistics.median(t) for name, t in times.items()}


def reset_peak(device):
    """Start a new peak-memory window: CUDA allocator stats, or the process's peak RSS (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_mib(device):
    """Peak memory since reset_peak: CUDA allocated bytes, or the process's VmHWM on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def allocator_settings():
    """The allocator environment this process started with (glibc malloc tunables, a preloaded
    jemalloc): they change step times, so bench.json records them. Empty: glibc defaults."""
    return {key: os.environ[key] for key in ALLOCATOR_ENV if os.environ.get(key)}


def matmul_gflops(device, dtype, n, repeats):
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    seconds = interleaved({"mm": lambda: a @ b}, device, repeats)["mm"]
    return 2 * n ** 3 / seconds / 1e9


def copy_gbps(device, mib, repeats):
    src = torch.empty(mib * 2 ** 18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    seconds = interleaved({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * src.nbytes / seconds / 1e9  # read + write


def bf16_supported(device):
    """Native bf16 only: emulated bf16 on an AVX2 CPU is tens of times slower than fp32."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()


LOW_PRECISION_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def ceilings(device, quick, repeats, amp_dtype=None):
    """{"matmul_gflops", "matmul_bf16_gflops" (native bf16 only), "matmul_fp16_gflops" (fp16 steps
    only), "copy_gbps"}."""
    n = 2048 if quick else 4096
    out = {"matmul_gflops": matmul_gflops(device, torch.float32, n, repeats)}
    if bf16_supported(device):
        out["matmul_bf16_gflops"] = matmul_gflops(device, torch.bfloat16, n, repeats)
    if amp_dtype == torch.float16:
        out["matmul_fp16_gflops"] = matmul_gflops(device, torch.float16, n, repeats)
    out["copy_gbps"] = copy_gbps(device, 256, repeats)
    return out


def ceiling_fractions(gflops, ceiling, amp_dtype):
    """The step's share of the ceiling of its own precision (step_frac_of_ceiling: the bf16 ceiling
    for a bf16 step, fp32 for fp32 or where bf16 is only emulated) and of every ceiling measured
    (step_frac_of_fp32_ceiling, step_frac_of_bf16_ceiling, step_frac_of_fp16_ceiling)."""
    out = {"step_frac_of_fp32_ceiling": gflops / ceiling["matmul_gflops"]}
    for name in LOW_PRECISION_KEYS.values():
        if f"matmul_{name}_gflops" in ceiling:
            out[f"step_frac_of_{name}_ceiling"] = gflops / ceiling[f"matmul_{name}_gflops"]
    in_use = f"step_frac_of_{LOW_PRECISION_KEYS.get(amp_dtype, 'fp32')}_ceiling"
    out["step_frac_of_ceiling"] = out.get(in_use, out["step_frac_of_fp32_ceiling"])
    return out
