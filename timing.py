"""Timing and peak memory for benchmarks: medians of interleaved repeats (A B A B, so a shared
machine's drifting load falls on every contender alike), CUDA-synchronised, and the peak memory of
a window (CUDA allocator, or the process's peak RSS on a CPU).
"""
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns, device, repeats, warmup=1):
    """{name: median seconds}, running the callables in turn (A B A B ...) after `warmup` rounds each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
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
