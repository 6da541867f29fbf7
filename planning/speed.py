"""How fast the device trains: the speed table and the lines fitted through it."""
import dataclasses
import logging
import math
import time

import numpy as np
import torch

from config import ModelConfig
from losses import DiceBCELoss
from model import build_model

log = logging.getLogger(__name__)

SPEED_SIZES = ((32, 32, 32), (48, 48, 48), (64, 64, 64))  # sample sizes measure_speed times by default
# Batch of 2 as nnU-Net in 3D: under a time budget a larger batch buys fewer steps, and instance
# norm needs no batch statistics. The planner plans it; the speed table times it.
BATCH_SIZE = 2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats):
    """The fastest of `repeats` timed calls after one warm-up (allocator, kernels, autotuning): on a
    shared machine a call is only ever slowed down by others, so the minimum is the best estimate."""
    fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_speed(model_cfg, device, sizes=SPEED_SIZES, batch_size=BATCH_SIZE, widths=None, repeats=2,
                  amp_dtype=None, prepare=None, seed=0, max_seconds=None):
    """Time real training steps (forward, Dice+BCE loss, backward, Adam step) and no-grad forwards
    at each sample size and network width, after one warm-up each. model_cfg: a ModelConfig or a
    dict of its fields; widths: base_channels to time (default: model_cfg's); prepare: optional
    model -> model (e.g. train.prepare_model) so the timing sees the layout training uses;
    max_seconds: time no further size of a width once its sizes so far took this long (a slow or busy
    device still gets at least one point per width; give the sizes smallest first).
    Returns the speed table {"device", "batch_size", "depth", "points": [...]}."""
    model_cfg = ModelConfig(**model_cfg) if isinstance(model_cfg, dict) else model_cfg
    device = torch.device(device)
    torch.manual_seed(seed)
    points = []
    for width in widths or (model_cfg.base_channels,):
        model = build_model(dataclasses.replace(model_cfg, base_channels=width)).to(device)
        model = prepare(model) if prepare else model
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss_fn = DiceBCELoss()
        width_start = time.perf_counter()
        for size in sizes:
            timed = [p for p in points if p["base_channels"] == width]
            if timed and max_seconds is not None and time.perf_counter() - width_start > max_seconds:
                log.info("speed: width %d timed at %d of %d sizes (max_seconds %g)", width, len(timed), len(sizes),
                         max_seconds)
                break
            image = torch.randn(batch_size, model_cfg.in_channels, *size, device=device)
            target = (torch.rand(batch_size, model_cfg.out_channels, *size, device=device) > 0.9).float()

            def step():
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = loss_fn(model(image), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            def forward():
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                     enabled=amp_dtype is not None):
                    model(image)

            model.train()
            step_s = _time(step, device, repeats)
            model.eval()
            forward_s = _time(forward, device, repeats)
            points.append({"base_channels": width, "size": list(size), "voxels": batch_size * math.prod(size),
                           "step_seconds": step_s, "forward_seconds": forward_s})
            log.debug("speed: width %d, %s x %d: %.3f s/step, %.3f s/forward", width, size, batch_size,
                      step_s, forward_s)
    return {"device": str(device), "precision": str(amp_dtype or torch.float32).replace("torch.", ""),
            "batch_size": batch_size, "depth": model_cfg.depth, "points": points}


def fit_line(voxels, seconds):
    """(intercept s, slope s/voxel) of a least-squares line; through the origin when the line
    would have a negative intercept or slope (timing noise at small sizes)."""
    v, t = np.asarray(voxels, np.float64), np.asarray(seconds, np.float64)
    if len(v) >= 2 and np.ptp(v) > 0:
        slope, intercept = np.polyfit(v, t, 1)
        if slope > 0 and intercept >= 0:
            return float(intercept), float(slope)
    return 0.0, float((t * v).sum() / (v * v).sum())


def fit_speed(speed):
    """{base_channels: {"step": (a, b), "forward": (a, b)}}: seconds = a + b * voxels in the batch."""
    widths = sorted({p["base_channels"] for p in speed["points"]})
    fits = {}
    for width in widths:
        points = [p for p in speed["points"] if p["base_channels"] == width]
        voxels = [p["voxels"] for p in points]
        fits[width] = {"step": fit_line(voxels, [p["step_seconds"] for p in points]),
                       "forward": fit_line(voxels, [p["forward_seconds"] for p in points])}
    return fits


def seconds_at(line, voxels):
    """Seconds a fitted line (fit_speed) gives for a batch of `voxels`."""
    return line[0] + line[1] * voxels
