"""Timing a call as the machine runs it: the one stopwatch the planner and the benchmarks share."""
import time

import torch


def sync(device):
    """Wait for the work queued on a CUDA device, so a stopwatch sees it finish; nothing elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, *args, device=None):
    """(fn(*args), wall seconds, CPU seconds of this process, all its threads). With a CUDA `device`
    the queued work is waited for before and after, so the seconds are the call's own."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    sync(device)
    return result, time.perf_counter() - wall, time.process_time() - cpu
