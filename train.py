"""The training loop: one epoch of steps, one validation pass, bookkeeping; repeat.

A step is: autocast (train.precision), loss, zero_grad, backward, unscale, clip, optimizer step.
After each epoch: ReduceLROnPlateau on the validation loss, best.pt when the mean validation
Dice improves, early stopping after `train.patience` epochs without improvement, a row in
metrics.csv, curves.png redrawn, last.pt written. Every file is written atomically.
Steps with a NaN/Inf loss or gradient are skipped; SIGINT/SIGTERM end the run after the current
step with last.pt written, so `main.py --resume RUN_DIR` continues exactly where it stopped.
Under torchrun (see distributed.py) each rank trains on its shard, validation is sharded and its
counts summed across ranks, every stop decision is agreed by all ranks, and rank 0 alone writes.
"""
import csv
import io
import logging
import math
import os
import signal
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

import distributed

from atomic import atomic_path, write_text
from checkpoint import restore_rng_states, rng_states, save_checkpoint, save_last, unwrap
from config import to_dict
from inference import autocast, model_predictor, sliding_window
from loaders import loader_workers, make_loader
from metrics import confusion, scores_from_counts
from transforms import task_regions

log = logging.getLogger(__name__)

# metrics.csv columns: epoch, train_loss, val_loss, val_dice_<region> per region of data.task
# (val_dice_wt/tc/et for BraTS, val_dice_tumour for binary), lr, seconds: the keys of a history row.


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device, amp, precision="auto"):
    """The autocast dtype of a training step or a prediction; None runs plain fp32.

    "auto": bf16 on GPUs that have it, else fp16 (with a loss scaler); on CPU bf16 only where
    oneDNN runs it natively (AVX-512/AMX): on an AVX2-only CPU a bf16 step measured 40x slower
    than fp32 (README_BENCH.md), so there "auto" is fp32. amp False means fp32 everywhere.
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


def prepare_model(model, train_cfg, device):
    """The model as a step and a prediction run it: channels-last memory layout (train.channels_last)
    and torch.compile (train.compile). Same code on CPU and CUDA; checkpoint.unwrap undoes compile."""
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d if unwrap(model).dims == 3 else torch.channels_last)
    if train_cfg.compile:
        model = torch.compile(model)
    return model


class EarlyStopping:
    """Counts epochs without improvement of a higher-is-better score."""

    def __init__(self, patience, best=-math.inf, bad_epochs=0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def update(self, score):
        """Record a score; True when it is a new best."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self):
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self):
        return {"patience": self.patience, "best": self.best, "bad_epochs": self.bad_epochs}


class TrainingStopped(RuntimeError):
    """Training cannot go on (diverged); last.pt still holds the last good epoch."""


class GracefulStop:
    """SIGINT/SIGTERM set a flag the loop checks after each step, instead of killing it mid-write."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: finishing this step, then writing last.pt", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self):
        return self.signal is not None


class BadStepGuard:
    """Skips steps whose loss or gradient is NaN/Inf; too many in a row stop training."""

    def __init__(self, limit):
        self.limit, self.in_a_row = limit, 0

    def check(self, value, what):
        # under DDP the ranks agree: one rank's NaN loss skips the step everywhere (else the others
        # would wait in backward's all-reduce for a rank that never joins)
        if not distributed.broadcast_flag(not torch.isfinite(value)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning("non-finite %s (%s): step skipped (%d in a row)", what, value.item(), self.in_a_row)
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingStopped(f"{self.in_a_row} consecutive steps with a NaN/Inf loss or gradient; "
                                  f"training stopped, last.pt holds the last good epoch (lower train.lr?)")
        return False


def train_step(model, batch, loss_fn, optimizer, scaler, device, amp_dtype, grad_clip, guard):
    """One optimisation step; returns the loss, or None when the step was skipped."""
    image = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    with autocast(device, amp_dtype):
        loss = loss_fn(model(image), target)
    optimizer.zero_grad(set_to_none=True)
    if not guard.check(loss.detach(), "loss"):
        return None
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    # with fp16 the scaler itself skips overflowing steps and lowers its scale: no need to count them
    if not scaler.is_enabled() and not guard.check(norm, "gradient norm"):
        optimizer.zero_grad(set_to_none=True)
        return None
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, device, amp_dtype, grad_clip, guard, stop,
                    progress, desc):
    """Steps over the loader; `progress` ({"steps", "loss_sum", "count"}) carries a resumed partial epoch.
    Returns early, with progress up to date, when a stop was requested."""
    model.train()
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        loss = train_step(model, batch, loss_fn, optimizer, scaler, device, amp_dtype, grad_clip, guard)
        progress["steps"] += 1
        if loss is not None:
            progress["loss_sum"] += loss * len(batch["image"])
            progress["count"] += len(batch["image"])
        if distributed.broadcast_flag(stop.requested):  # all ranks stop after the same step
            break
    return progress


@torch.no_grad()
def validate(model, loader, loss_fn, device, amp_dtype, threshold, window=None, overlap=0.5, sw_batch_size=2,
             region_names=("WT", "TC", "ET")):
    """Mean loss and mean per-case Dice per region (at the training grid, for monitoring).

    Voxel counts are summed per case before Dice is taken, so the 2D slices of one case score as
    one volume (an empty slice predicted empty is not a free 1). With a `window` (patch mode) each
    batch holds whole cases, predicted by sliding window. Under DDP each rank scores its shard and
    the losses and per-case counts are summed across ranks, so every rank returns the same figures."""
    model.eval()
    total, count, counts = 0.0, 0, {}
    for batch in loader:
        image, target = batch["image"].to(device), batch["target"].to(device)
        predictor = model_predictor(model, device, amp_dtype)
        if window is None:
            logits = predictor(image)
        else:
            logits = torch.stack([sliding_window(predictor, x, window, overlap, sw_batch_size) for x in image])
        total += loss_fn(logits, target).item() * image.shape[0]
        count += image.shape[0]
        pred = (torch.sigmoid(logits.float()) > threshold).cpu().numpy()
        truth = target.cpu().numpy() > 0.5
        for case_id, p, t in zip(batch["case_id"], pred, truth):
            case = counts.setdefault(case_id, np.zeros((len(region_names), 4), np.int64))
            case += [confusion(p[r], t[r]) for r in range(len(region_names))]
    total, count = distributed.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    merged = {}
    for shard in distributed.gather_objects(counts):
        for case_id, case in shard.items():
            merged[case_id] = merged.get(case_id, 0) + case
    counts = {case_id: merged[case_id] for case_id in sorted(merged)}
    dice = {name: float(np.mean([scores_from_counts(*case[r])["dice"] for case in counts.values()]))
            for r, name in enumerate(region_names)}
    return total / max(count, 1), dice


def write_metrics_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def plot_curves(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax_loss.set(xlabel="epoch", ylabel="Dice + BCE loss", title="Loss")
    for key in [k for k in rows[0] if k.startswith("val_dice_")]:
        ax_dice.plot(epochs, [r[key] for r in rows], label=key[len("val_dice_"):])
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def checkpoint_state(model, optimizer, scheduler, scaler, stopper, epoch, cfg, history, partial=None):
    """Everything needed to continue exactly: `epoch` is the last completed one; `partial` describes
    steps already taken in the next one when a stop came mid-epoch."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(), "epoch": epoch, "best_score": stopper.best,
            "config": to_dict(cfg), "history": history, "rng": rng_states(), "partial": partial}


def restore_state(state, model, optimizer, scheduler, scaler, stopper):
    """Load a checkpoint into the training objects; returns (next epoch, history, epoch progress)."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    stopper.best, stopper.bad_epochs = state["early_stopping"]["best"], state["early_stopping"]["bad_epochs"]
    restore_rng_states(state["rng"])
    partial = state.get("partial")
    progress = {k: partial[k] for k in ("steps", "loss_sum", "count")} if partial else new_progress()
    return state["epoch"] + 1, list(state["history"]), progress


def new_progress():
    return {"steps": 0, "loss_sum": 0.0, "count": 0}


def fit(cfg, model, loss_fn, train_set, val_set, run_dir, device, resume=None):
    """Train until train.epochs, early stopping, train.max_minutes or a stop signal.

    Returns (path of best.pt, the signal number that stopped training or None). Under torchrun
    `model` is DDP-wrapped (distributed.wrap_model) and every rank calls fit; rank 0 writes."""
    tc = cfg.train
    world, main = distributed.world_size(), distributed.is_main()
    lr = tc.lr * world if tc.scale_lr else tc.lr  # linear scaling rule for the world-times larger batch
    if world > 1:
        log.info("DDP: %d processes, global batch %d, lr %g", world, tc.batch_size * world, lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=tc.lr_factor,
                                                           patience=tc.lr_patience)
    amp_dtype = autocast_dtype(device, tc.amp, tc.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(tc.patience)
    start_epoch, history, progress = 1, [], new_progress()
    if resume is not None:
        start_epoch, history, progress = restore_state(resume, model, optimizer, scheduler, scaler, stopper)
        log.info("resuming at epoch %d%s", start_epoch, f", step {progress['steps']}" if progress["steps"] else "")
        if not main:  # the saved partial-epoch loss is the sum over ranks: count it once
            progress.update(loss_sum=0.0, count=0)
    pin = device.type == "cuda"
    workers = loader_workers(cfg.data.num_workers, device)
    # patch mode validates whole cases of different sizes by sliding window: one case per batch
    window = tuple(cfg.data.patch_size) if cfg.data.mode == "patch" else None
    val_batch = 1 if window else cfg.eval.batch_size
    region_names = list(task_regions(cfg.data.task))
    val_loader = make_loader(val_set, val_batch, False, num_workers=workers, pin_memory=pin)
    best_path, started, guard = os.path.join(run_dir, "best.pt"), time.time(), BadStepGuard(tc.max_bad_steps)
    with GracefulStop() as stop:
        for epoch in range(start_epoch, tc.epochs + 1):
            epoch_start = time.time()
            train_set.set_epoch(epoch)
            train_loader = make_loader(train_set, tc.batch_size, True, num_workers=workers, seed=tc.seed,
                                       epoch=epoch, pin_memory=pin, skip_batches=progress["steps"])
            train_one_epoch(model, train_loader, loss_fn, optimizer, scaler, device, amp_dtype, tc.grad_clip,
                            guard, stop, progress, desc=f"epoch {epoch}/{tc.epochs}")
            loss_sum, count = distributed.all_reduce_sum(
                torch.tensor([progress["loss_sum"], progress["count"]], dtype=torch.float64)).tolist()
            if distributed.broadcast_flag(stop.requested):
                if main:
                    partial = dict(progress, loss_sum=loss_sum, count=int(count), epoch=epoch)
                    save_last(run_dir, checkpoint_state(model, optimizer, scheduler, scaler, stopper, epoch - 1,
                                                        cfg, history, partial=partial))
                distributed.barrier()
                return best_path, stop.signal or signal.SIGTERM  # another rank got the signal
            train_loss = loss_sum / max(count, 1)
            progress = new_progress()
            distributed.broadcast_buffers(model)  # batch norm statistics as rank 0 (and the checkpoint) has them
            # the bare module: validation shards differ in size, and DDP's forward would expect every rank
            val_loss, val_dice = validate(unwrap(model), val_loader, loss_fn, device, amp_dtype, cfg.eval.threshold,
                                          window, cfg.eval.overlap, cfg.eval.sw_batch_size, region_names)
            scheduler.step(val_loss)
            improved = stopper.update(float(np.mean(list(val_dice.values()))))
            history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
                            **{f"val_dice_{name.lower()}": round(v, 4) for name, v in val_dice.items()},
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - epoch_start, 1)})
            if main:
                state = checkpoint_state(model, optimizer, scheduler, scaler, stopper, epoch, cfg, history)
                if improved:
                    save_checkpoint(best_path, state)
                save_last(run_dir, state)
                write_metrics_csv(os.path.join(run_dir, "metrics.csv"), history)
                plot_curves(os.path.join(run_dir, "curves.png"), history)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice %s%s (%.0fs)", epoch, train_loss,
                     val_loss, " ".join(f"{name} {v:.3f}" for name, v in val_dice.items()),
                     " *best*" if improved else "", time.time() - epoch_start)
            # the ranks hold the same validation figures, but each reads its own clock: agree on stopping
            if distributed.broadcast_flag(stopper.should_stop):
                log.info("early stopping: no validation Dice improvement for %d epochs", tc.patience)
                break
            if distributed.broadcast_flag(tc.max_minutes and time.time() - started > tc.max_minutes * 60):
                log.info("stopping: train.max_minutes = %g reached", tc.max_minutes)
                break
    distributed.barrier()  # best.pt is on disk before any rank goes on to evaluate it
    return best_path, None
