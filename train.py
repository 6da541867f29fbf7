"""The training loop: one epoch of steps, one validation pass, bookkeeping; repeat.

A step is: autocast (train.precision), loss, zero_grad, backward, unscale, clip, optimizer step.
After each epoch: ReduceLROnPlateau on the validation loss, best.pt when the mean validation
Dice improves, early stopping after `train.patience` epochs without improvement, a row in
metrics.csv, curves.png redrawn, last.pt written. Every file is written atomically.
"""
import csv
import io
import logging
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from atomic import atomic_path, write_text
from checkpoint import save_checkpoint, unwrap
from config import to_dict
from dataset import loader_workers, make_loader
from inference import model_predictor, sliding_window
from metrics import confusion, scores_from_counts
from transforms import REGIONS

log = logging.getLogger(__name__)
CSV_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice_wt", "val_dice_tc", "val_dice_et", "lr", "seconds"]


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


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, device, amp_dtype, grad_clip, desc):
    model.train()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        image = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * image.shape[0]
        count += image.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def validate(model, loader, loss_fn, device, amp_dtype, threshold, window=None, overlap=0.5, sw_batch_size=2):
    """Mean loss and mean per-case Dice per region (at the training grid, for monitoring).

    With a `window` (patch mode) each batch holds whole cases, predicted by sliding window."""
    model.eval()
    total, count, dice = 0.0, 0, {name: [] for name in REGIONS}
    for batch in loader:
        image, target = batch["image"].to(device), batch["target"].to(device)
        if window is None:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(image)
        else:
            predictor = model_predictor(model, device, amp_dtype)
            logits = torch.stack([sliding_window(predictor, x, window, overlap, sw_batch_size) for x in image])
        total += loss_fn(logits, target).item() * image.shape[0]
        count += image.shape[0]
        pred = (torch.sigmoid(logits.float()) > threshold).cpu().numpy()
        truth = target.cpu().numpy() > 0.5
        for p, t in zip(pred, truth):
            for r, name in enumerate(REGIONS):
                dice[name].append(scores_from_counts(*confusion(p[r], t[r]))["dice"])
    return total / max(count, 1), {name: float(np.mean(v)) for name, v in dice.items()}


def write_metrics_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
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
    for key, name in (("val_dice_wt", "WT"), ("val_dice_tc", "TC"), ("val_dice_et", "ET")):
        ax_dice.plot(epochs, [r[key] for r in rows], label=name)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def checkpoint_state(model, optimizer, scheduler, scaler, stopper, epoch, cfg, history):
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "early_stopping": stopper.state_dict(), "epoch": epoch, "best_score": stopper.best,
            "config": to_dict(cfg), "history": history}


def fit(cfg, model, loss_fn, train_set, val_set, run_dir, device):
    """Train until train.epochs, early stopping or train.max_minutes; returns the path of best.pt."""
    tc = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=tc.lr_factor,
                                                           patience=tc.lr_patience)
    model = prepare_model(model, tc, device)
    amp_dtype = autocast_dtype(device, tc.amp, tc.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(tc.patience)
    history, started = [], time.time()
    pin = device.type == "cuda"
    workers = loader_workers(cfg.data.num_workers, device)
    # patch mode validates whole cases of different sizes by sliding window: one case per batch
    window = tuple(cfg.data.patch_size) if cfg.data.mode == "patch" else None
    val_batch = 1 if window else cfg.eval.batch_size
    val_loader = make_loader(val_set, val_batch, False, workers, pin_memory=pin)
    best_path, last_path = os.path.join(run_dir, "best.pt"), os.path.join(run_dir, "last.pt")
    for epoch in range(1, tc.epochs + 1):
        epoch_start = time.time()
        train_set.set_epoch(epoch)
        train_loader = make_loader(train_set, tc.batch_size, True, workers, seed=tc.seed,
                                   epoch=epoch, pin_memory=pin)
        train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer, scaler, device, amp_dtype,
                                     tc.grad_clip, desc=f"epoch {epoch}/{tc.epochs}")
        val_loss, val_dice = validate(model, val_loader, loss_fn, device, amp_dtype, cfg.eval.threshold, window,
                                      cfg.eval.overlap, cfg.eval.sw_batch_size)
        scheduler.step(val_loss)
        improved = stopper.update(float(np.mean(list(val_dice.values()))))
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5),
                        "val_dice_wt": round(val_dice["WT"], 4), "val_dice_tc": round(val_dice["TC"], 4),
                        "val_dice_et": round(val_dice["ET"], 4), "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(time.time() - epoch_start, 1)})
        state = checkpoint_state(model, optimizer, scheduler, scaler, stopper, epoch, cfg, history)
        if improved:
            save_checkpoint(best_path, state)
        save_checkpoint(last_path, state)
        write_metrics_csv(os.path.join(run_dir, "metrics.csv"), history)
        plot_curves(os.path.join(run_dir, "curves.png"), history)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val Dice WT %.3f TC %.3f ET %.3f%s (%.0fs)",
                 epoch, train_loss, val_loss, val_dice["WT"], val_dice["TC"], val_dice["ET"],
                 " *best*" if improved else "", time.time() - epoch_start)
        if stopper.should_stop:
            log.info("early stopping: no validation Dice improvement for %d epochs", tc.patience)
            break
        if tc.max_minutes and time.time() - started > tc.max_minutes * 60:
            log.info("stopping: train.max_minutes = %g reached", tc.max_minutes)
            break
    return best_path
