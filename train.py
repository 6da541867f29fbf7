"""The training loop: one epoch of steps, one validation pass, bookkeeping; repeat.

A step is step.train_step (autocast, loss, zero_grad, backward, unscale, clip, optimizer step) on
the objects of a step.Run. After each epoch: validation (`validate`: whole validation cases
predicted, postprocessed and scored at their native grid exactly as evaluate.py does, through
scoring.evaluate_case), ReduceLROnPlateau on the validation loss, best.pt when the mean
validation Dice improves, early stopping after `train.patience` epochs without improvement, a
row in metrics.csv, curves.png redrawn, last.pt written. Every file is written atomically.
With no validation cases (data.val_fraction 0) the training loss takes the validation's place:
best.pt, the learning-rate schedule and early stopping follow it, and metrics.csv has no val_*
columns.
Steps with a NaN/Inf loss or gradient are skipped; SIGINT/SIGTERM end the run after the current
step with last.pt written, so `main.py --resume RUN_DIR` continues exactly where it stopped.
Under torchrun (see distributed.py) each rank trains on its shard, validation cases are sharded
and their scores gathered, every stop decision is agreed by all ranks, and rank 0 alone writes.
"""
import logging
import os
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

import distributed
from checkpoint import restore_rng_states, rng_states, save_checkpoint, save_last, unwrap
from config import to_dict
from cases import case_format
from guards import GracefulStop
from loaders import loader_workers, make_loader
from reporting import write_history
from scoring import CaseCache, evaluate_case
from step import train_step
from transforms import task_regions

log = logging.getLogger(__name__)

# metrics.csv columns: epoch, train_loss, val_loss, val_dice_<region> per region of data.task
# (val_dice_wt/tc/et for BraTS, val_dice_tumour for binary), lr, seconds: the keys of a history row.
# Without validation cases the val_* columns are left out.


def train_one_epoch(run, loader, stop, progress, desc="train"):
    """Steps over the loader; `progress` ({"steps", "loss_sum", "count"}) carries a resumed partial epoch.
    Returns early, with progress up to date, when a stop was requested."""
    run.model.train()
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        loss = train_step(run, batch)
        progress["steps"] += 1
        if loss is not None:
            progress["loss_sum"] += loss * len(batch["image"])
            progress["count"] += len(batch["image"])
        if distributed.broadcast_flag(stop.requested):  # all ranks stop after the same step
            break
    return progress


@torch.no_grad()
def validate(run, paths, cache):
    """(val_loss, {region: mean Dice}) over the validation cases `paths`, or None without cases.

    Each case is predicted, postprocessed and scored at its native grid by scoring.evaluate_case,
    as evaluate.py scores a test case (every eval.* key applies; no HD95); Dice comes from the
    case's voxel counts and is averaged over cases (slices mode: a case is a patient). val_loss is
    run.loss_fn on the case's native-grid probabilities (as logits, clamped at 1e-6) against its
    regions, averaged over cases. Under DDP each rank scores cases rank, rank + world, ... read
    through `cache` (a scoring.CaseCache) and the per-case figures are gathered, so every rank
    returns the same figures."""
    if not paths:
        return None
    model, regions = unwrap(run.model), list(task_regions(run.cfg.data.task))  # bare: shards differ in size
    mine = {}
    for path in paths[distributed.rank()::distributed.world_size()]:
        case = cache.read(path)
        result = evaluate_case(model, case, run.cfg, run.device, run.amp_dtype, with_hd95=False)
        logits = torch.logit(result.probs, eps=1e-6)[None]
        loss = run.loss_fn(logits, torch.from_numpy(result.truth).float()[None]).item()
        mine[case.case_id] = (loss, [result.scores[name]["dice"] for name in regions])
    merged = {cid: figures for shard in distributed.gather_objects(mine) for cid, figures in shard.items()}
    losses, dice = zip(*(merged[cid] for cid in sorted(merged)))
    return float(np.mean(losses)), dict(zip(regions, np.mean(dice, axis=0).tolist()))


def end_of_epoch(run, epoch, train_loss, validation, seconds):
    """Step the scheduler and early stopping on the epoch's figures and log them; returns
    (history row, improved). Without validation (None) both follow the training loss."""
    if validation is None:
        run.scheduler.step(train_loss)
        improved, val, text = run.stopper.update(-train_loss), {}, ""
    else:
        val_loss, val_dice = validation
        run.scheduler.step(val_loss)
        improved = run.stopper.update(float(np.mean(list(val_dice.values()))))
        val = {"val_loss": round(val_loss, 5), **{f"val_dice_{n.lower()}": round(v, 4) for n, v in val_dice.items()}}
        text = f", val loss {val_loss:.4f}, val Dice " + " ".join(f"{n} {v:.3f}" for n, v in val_dice.items())
    log.info("epoch %d: train loss %.4f%s%s (%.0fs)", epoch, train_loss, text, " *best*" if improved else "", seconds)
    row = {"epoch": epoch, "train_loss": round(train_loss, 5), **val, "lr": run.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 1)}
    return row, improved


def checkpoint_state(run, epoch, history, partial=None):
    """Everything needed to continue exactly: `epoch` is the last completed one; `partial` describes
    steps already taken in the next one when a stop came mid-epoch."""
    return {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "early_stopping": run.stopper.state_dict(), "epoch": epoch, "best_score": run.stopper.best,
            "config": to_dict(run.cfg), "history": history, "rng": rng_states(), "partial": partial}


def restore_state(run, state):
    """Load a checkpoint into the run's objects; returns (next epoch, history, epoch progress)."""
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.stopper.best, run.stopper.bad_epochs = state["early_stopping"]["best"], state["early_stopping"]["bad_epochs"]
    restore_rng_states(state["rng"])
    partial = state.get("partial")
    progress = {k: partial[k] for k in ("steps", "loss_sum", "count")} if partial else new_progress()
    log.info("resuming at epoch %d%s", state["epoch"] + 1, f", step {progress['steps']}" if progress["steps"] else "")
    if not distributed.is_main():  # the saved partial-epoch loss is the sum over ranks: count it once
        progress.update(loss_sum=0.0, count=0)
    return state["epoch"] + 1, list(state["history"]), progress


def new_progress():
    return {"steps": 0, "loss_sum": 0.0, "count": 0}


def epoch_loader(run, train_set, epoch, skip_batches):
    """This rank's training batches of an epoch, skipping those a resumed partial epoch took."""
    train_set.set_epoch(epoch)
    return make_loader(train_set, run.cfg.train.batch_size, True,
                       num_workers=loader_workers(run.cfg.data.num_workers, run.device), seed=run.cfg.train.seed,
                       epoch=epoch, pin_memory=run.device.type == "cuda", skip_batches=skip_batches)


def epoch_train_loss(progress):
    """The mean training loss of an epoch over all ranks, and its (loss_sum, count) totals."""
    loss_sum, count = distributed.all_reduce_sum(
        torch.tensor([progress["loss_sum"], progress["count"]], dtype=torch.float64)).tolist()
    return loss_sum / max(count, 1), loss_sum, int(count)


def should_stop(run, started):
    """Early stopping or train.max_minutes, agreed by all ranks (each reads its own clock)."""
    if distributed.broadcast_flag(run.stopper.should_stop):
        log.info("early stopping: no improvement for %d epochs", run.cfg.train.patience)
        return True
    minutes = run.cfg.train.max_minutes
    if distributed.broadcast_flag(minutes and time.time() - started > minutes * 60):
        log.info("stopping: train.max_minutes = %g reached", minutes)
        return True
    return False


def fit(run, train_set, val_paths, run_dir, resume=None):
    """Train until train.epochs, early stopping, train.max_minutes or a stop signal.

    `run` is a step.Run (step.make_run), `val_paths` the validation case files, `resume` a loaded
    checkpoint to continue. Returns (path of best.pt, the signal number that stopped training or
    None). Under torchrun `run.model` is DDP-wrapped and every rank calls fit; rank 0 writes."""
    start_epoch, history, progress = restore_state(run, resume) if resume else (1, [], new_progress())
    best_path, started, epochs = os.path.join(run_dir, "best.pt"), time.time(), run.cfg.train.epochs
    cache = CaseCache(case_format(run.cfg.data), run.cfg.data.cache_gb * 2 ** 30)  # validation cases
    if not val_paths:
        log.info("no validation cases (data.val_fraction 0): best.pt, the learning rate and early stopping "
                 "follow the training loss")
    with GracefulStop() as stop:
        for epoch in range(start_epoch, epochs + 1):
            epoch_start = time.time()
            loader = epoch_loader(run, train_set, epoch, progress["steps"])
            train_one_epoch(run, loader, stop, progress, desc=f"epoch {epoch}/{epochs}")
            train_loss, loss_sum, count = epoch_train_loss(progress)
            if distributed.broadcast_flag(stop.requested):
                if distributed.is_main():
                    partial = dict(progress, loss_sum=loss_sum, count=count, epoch=epoch)
                    save_last(run_dir, checkpoint_state(run, epoch - 1, history, partial))
                distributed.barrier()
                return best_path, stop.signal or signal.SIGTERM  # another rank got the signal
            progress = new_progress()
            distributed.broadcast_buffers(run.model)  # batch norm statistics as rank 0 (and the checkpoint) has them
            validation = validate(run, val_paths, cache)
            row, improved = end_of_epoch(run, epoch, train_loss, validation, time.time() - epoch_start)
            history.append(row)
            if distributed.is_main():
                write_outputs(run, run_dir, history, improved)
            if should_stop(run, started):
                break
    distributed.barrier()  # best.pt is on disk before any rank goes on to evaluate it
    return best_path, None


def write_outputs(run, run_dir, history, improved):
    """last.pt, best.pt when the epoch improved, metrics.csv and curves.png; rank 0 only."""
    state = checkpoint_state(run, history[-1]["epoch"], history)
    if improved:
        save_checkpoint(os.path.join(run_dir, "best.pt"), state)
    save_last(run_dir, state)
    write_history(run_dir, history)
