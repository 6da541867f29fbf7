"""The objects of a training run, and one optimisation step over them.

A step is: autocast (train.precision), loss, zero_grad, backward, unscale, clip, optimizer step;
a NaN/Inf loss or gradient skips it (guards.BadStepGuard). train.py runs it every step, and the
planner (planning/speed.py) and bench.py time this same function, so both measure what training does.
Under train.schedule poly or cosine the learning rate is a pure function of the global step
(`scheduled_lr`, nanoGPT's way), so a resumed run, which restores the step, continues it exactly.
"""
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from config import Config
from runtime import distributed
from runtime.precision import autocast, autocast_dtype
from training.guards import BadStepGuard, EarlyStopping

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a step, an epoch and a checkpoint act on."""
    cfg: Config                      # the resolved config (saved in every checkpoint)
    model: torch.nn.Module           # possibly DDP/compile-wrapped; checkpoint.unwrap gives the bare module
    loss_fn: Callable                # (logits, target) -> scalar loss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None  # train.schedule plateau; None: by step
    scaler: torch.amp.GradScaler     # enabled only for fp16 autocast
    guard: BadStepGuard              # skips NaN/Inf steps, stops after train.max_bad_steps in a row
    stopper: EarlyStopping           # best score so far and epochs without improvement
    device: torch.device
    amp_dtype: torch.dtype | None    # autocast dtype; None runs fp32
    grad_clip: float                 # max gradient norm; 0 disables clipping
    base_lr: float = 1e-3            # the learning rate the schedule starts from (after warm-up)
    step: int = 0                    # optimizer steps taken so far (batches, skipped ones included)
    started: float = 0.0             # time.time() when the run's clock started (train.max_minutes)
    fit_steps_to_budget: bool = False  # a planned train.max_steps: re-fit it to the pace of each round (train.refit_steps)


def scheduled_lr(lr, step, tc):
    """The learning rate of global step `step` (0-based) under train.schedule poly or cosine: a linear
    warm-up over train.warmup_steps, then a decay from lr to 0 at train.max_steps (poly: nnU-Net's
    (1 - t) ** 0.9; cosine: half a cosine), t the share of the post-warm-up steps taken."""
    if step < tc.warmup_steps:
        return lr * (step + 1) / (tc.warmup_steps + 1)
    t = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return lr * (1 - t) ** 0.9 if tc.schedule == "poly" else lr * 0.5 * (1 + math.cos(math.pi * t))


def make_run(cfg, model, loss_fn, device):
    """The optimizer (Adam), scheduler, scaler and guards of a run over `model` on `device`."""
    tc, world = cfg.train, distributed.world_size()
    lr = tc.lr * world if tc.scale_lr else tc.lr  # linear scaling rule for the world-times larger batch
    if world > 1:
        log.info("DDP: %d processes, global batch %d, lr %g", world, tc.batch_size * world, lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=tc.weight_decay)
    plateau = tc.schedule == "plateau"  # early stopping too: a schedule by step spends the whole budget
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=tc.lr_factor,
                                                           patience=tc.lr_patience) if plateau else None
    amp_dtype = autocast_dtype(device, tc.amp, tc.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Run(cfg, model, loss_fn, optimizer, scheduler, scaler, BadStepGuard(tc.max_bad_steps),
               EarlyStopping(tc.patience if plateau else 0), device, amp_dtype, tc.grad_clip, base_lr=lr,
               started=time.time())


def train_step(run, batch):
    """One optimisation step on a batch {"image", "target"}; returns the loss, or None when skipped.
    Counts the step (run.step), and sets its learning rate first under a schedule by step."""
    if run.scheduler is None:
        for group in run.optimizer.param_groups:
            group["lr"] = scheduled_lr(run.base_lr, run.step, run.cfg.train)
    run.step += 1
    image = batch["image"].to(run.device, non_blocking=True)
    target = batch["target"].to(run.device, non_blocking=True)
    with autocast(run.device, run.amp_dtype):
        loss = run.loss_fn(run.model(image), target)
    run.optimizer.zero_grad(set_to_none=True)
    if not run.guard.check(loss.detach(), "loss"):
        return None
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip if run.grad_clip > 0 else math.inf)
    # with fp16 the scaler itself skips overflowing steps and lowers its scale: no need to count them
    if not run.scaler.is_enabled() and not run.guard.check(norm, "gradient norm"):
        run.optimizer.zero_grad(set_to_none=True)
        return None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.item()
