"""How fast training runs on this device: training's own step, fed by its own loader, timed at a few
sample sizes, and the lines fitted through the times.

A timed step is what train.py does each step: the next batch from training.loaders.make_loader over
dataset.build_dataset of the training cases (reading, normalising, augmenting, collating), then
training.step.train_step (autocast in train.precision, DiceBCELoss, backward, clipping, Adam) on
the model as training prepares it (channels-last; not compiled: compiling takes minutes), at the
torch threads this process trains with. So the seconds a step costs include loading its data.
"""
import copy
import dataclasses
import itertools
import logging
import math
import statistics
import time

import numpy as np
import torch

from config import PLANNER
from dataset import build_dataset
from losses import DiceBCELoss
from model import build_model
from runtime.device import prepare_model
from runtime.precision import autocast
from runtime.timing import timed
from training.loaders import loader_workers, make_loader
from training.step import make_run, train_step

log = logging.getLogger(__name__)


def timing_config(cfg, size, batch_size):
    """cfg as a run training on samples of `size` in batches of `batch_size`: 3D, patches at the native
    spacing (the sample read from disk each step); 2D, the configured slices."""
    data = cfg.data
    if cfg.model.dims == 3:
        data = dataclasses.replace(data, mode="patch", patch_size=tuple(size), spacing=())
    train = dataclasses.replace(cfg.train, batch_size=batch_size, compile=False)
    return dataclasses.replace(cfg, data=data, train=train)


def training_batches(train_set, cfg, device):
    """The batches training draws, epoch after epoch, from loaders built as train.py builds them."""
    if len(train_set) == 0:
        raise ValueError("measure_speed: the training set is empty; no step to time")
    workers = loader_workers(cfg.data.num_workers, device)
    for epoch in itertools.count(1):
        train_set.set_epoch(epoch)
        yield from make_loader(train_set, cfg.train.batch_size, num_workers=workers, seed=cfg.train.seed, epoch=epoch,
                               pin_memory=device.type == "cuda")


def with_size(train_set, data_cfg):
    """The training set serving samples of data_cfg's size; what it has read of each case (statistics,
    tumour voxels, prepared cases) is shared, as a run reads it once for all its steps."""
    sized = copy.copy(train_set)
    sized.cfg = data_cfg
    return sized


def warm_up(run, train_set, batches):
    """One untimed step on the first batch, and one on a batch as small as an epoch's last when the
    cases do not fill it: the first call at each batch shape allocates and chooses its kernels.
    Returns the first batch."""
    first = next(batches)
    train_step(run, first)
    rest = len(train_set) % run.cfg.train.batch_size
    if 0 < rest < len(first["image"]):
        train_step(run, {"image": first["image"][:rest], "target": first["target"][:rest]})
    return first


def time_size(run, train_set, steps):
    """{"step_seconds", "data_seconds", "forward_seconds"} at run.cfg's sample size: the mean over
    `steps` training steps, each with its batch's loading, after warm_up, and the mean of two
    no-grad forwards of a full batch after one untimed (the unit of a validation's cost)."""
    batches = training_batches(train_set, run.cfg, run.device)
    run.model.train()
    first = warm_up(run, train_set, batches)
    data_s, step_s = [], []
    for _ in range(max(1, steps)):
        batch, wall, _ = timed(next, batches)
        data_s.append(wall)
        step_s.append(wall + timed(train_step, run, batch, device=run.device)[1])
    batches.close()
    image = first["image"].to(run.device)

    def forward():
        with torch.no_grad(), autocast(run.device, run.amp_dtype):
            run.model(image)

    run.model.eval()
    forward()
    forward_s = [timed(forward, device=run.device)[1] for _ in range(2)]
    return {"step_seconds": statistics.mean(step_s), "data_seconds": statistics.mean(data_s),
            "forward_seconds": statistics.mean(forward_s)}


def read_cases_once(train_set, cfg, device, batches):
    """Draw the first `batches` batches untimed, so what a run reads once per case (normalisation
    statistics, tumour voxels) is read; every size then draws the same cases in the same order."""
    for _ in itertools.islice(training_batches(train_set, cfg, device), batches):
        pass


def predicted_seconds(point, voxels, steps):
    """Seconds timing a sample of `voxels` would take (warm-up, timed steps, forwards), scaled by
    voxels from a timed point, without the one-time costs the first size paid."""
    scale = voxels / point["voxels"]
    return ((steps + 2) * point["step_seconds"] + 3 * point["forward_seconds"]) * scale


def measure_speed(cfg, train_paths, device, sizes, *, batch_size=PLANNER.batch_size, steps=PLANNER.speed_steps,
                  max_seconds=None):
    """Time training steps with their data loading, and no-grad forwards, at each sample size of
    `sizes`, in that order, with cfg's model, precision, loss and loader over the case files
    `train_paths`. max_seconds: start no further size whose timing (predicted_seconds from the last
    size's) would end past this many seconds since the start; the first size is always timed.
    Returns the speed table {"device", "precision", "threads", "batch_size", "depth", "base_channels",
    "points": [{"size", "voxels", "step_seconds", "data_seconds", "forward_seconds", "seconds"}]}."""
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(build_model(cfg.model).to(device), dataclasses.replace(cfg.train, compile=False), device)
    loss_fn = DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight, cfg.train.batch_dice)
    start, points, train_set, run = time.perf_counter(), [], None, None
    for size in sizes:
        voxels = batch_size * math.prod(size)
        if points and max_seconds is not None and \
                time.perf_counter() - start + predicted_seconds(points[-1], voxels, steps) > max_seconds:
            log.info("speed: timed %d of %d sizes within %g s", len(points), len(sizes), max_seconds)
            break
        begun, sized = time.perf_counter(), timing_config(cfg, size, batch_size)
        # a patch set reads each sample at its size from disk, so its per-case reads carry over to the
        # next size; a slices set caches cases prepared at one size, so each size needs its own
        if train_set is None or sized.data.mode != "patch":
            train_set = build_dataset(sized.data, train_paths, seed=cfg.train.seed)
            read_cases_once(train_set, sized, device, steps + 1)
        else:
            train_set = with_size(train_set, sized.data)
        run = make_run(sized, model, loss_fn, device)
        point = {"base_channels": cfg.model.base_channels, "size": list(size), "voxels": voxels,
                 **time_size(run, train_set, steps)}
        points.append({**point, "seconds": time.perf_counter() - begun})
        log.debug("speed: %s x %d: %.3f s a step (%.3f s of it loading), %.3f s a forward", size, batch_size,
                  point["step_seconds"], point["data_seconds"], point["forward_seconds"])
    return {"device": str(device), "precision": str(run.amp_dtype or torch.float32).replace("torch.", ""),
            "threads": torch.get_num_threads(), "batch_size": batch_size, "depth": cfg.model.depth,
            "base_channels": cfg.model.base_channels, "points": points}


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
    """{"step": (a, b), "forward": (a, b)}: seconds = a + b * voxels in the batch, over the table's points."""
    voxels = [p["voxels"] for p in speed["points"]]
    return {"step": fit_line(voxels, [p["step_seconds"] for p in speed["points"]]),
            "forward": fit_line(voxels, [p["forward_seconds"] for p in speed["points"]])}


def seconds_at(line, voxels):
    """Seconds a fitted line (fit_speed) gives for a batch of `voxels`."""
    return line[0] + line[1] * voxels
