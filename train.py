"""The training loop: a round of steps, one validation pass, bookkeeping; repeat.

A step is training/step.train_step (autocast, loss, zero_grad, backward, unscale, clip, optimizer step) on
the objects of a training.step.Run. A round is an epoch, or train.val_every steps when set. After each
round: validation (`validate`: whole validation cases predicted, postprocessed and scored at their
native grid exactly as evaluate.py does, through evaluation/ensemble.evaluate_case), under train.schedule
plateau ReduceLROnPlateau on the validation loss and early stopping after `train.patience` rounds
without improvement (poly/cosine set the learning rate per step instead), best.pt when the mean
validation Dice improves (under poly/cosine, train.ship auto: every round, so the run ships its
final weights), a row in metrics.csv (epoch: the round's number, step: optimizer steps
so far), curves.png redrawn, last.pt written. Training ends at train.epochs, train.max_steps or
train.max_minutes, whichever comes first, after one last validation. Every file is written atomically.
With no validation cases (data.val_fraction 0) the training loss takes the validation's place:
best.pt, the learning-rate schedule and early stopping follow it, and metrics.csv has no val_*
columns.
Steps with a NaN/Inf loss or gradient are skipped; SIGINT/SIGTERM end the run after the current
step with last.pt written, so `main.py --resume RUN_DIR` continues exactly where it stopped.
Under torchrun (see runtime/distributed.py) each rank trains on its shard, validation cases are sharded
and their scores gathered, every stop decision is agreed by all ranks, and rank 0 alone writes.
"""
import logging
import math
import os
import signal
import time

import numpy as np
import torch
from tqdm import tqdm

from cases.cache import CaseCache
from cases.h5 import case_format
from config import PLANNER, ships_final_weights, to_dict
from evaluation.ensemble import evaluate_case
from planning.report import record_made_steps
from runtime import distributed
from runtime.atomic import write_json
from runtime.checkpoint import restore_rng_states, rng_states, save_checkpoint, save_last, unwrap
from training.guards import GracefulStop
from training.history import write_history
from training.loaders import loader_workers, make_loader
from training.step import train_step
from transforms.regions import task_regions

log = logging.getLogger(__name__)

# metrics.csv columns: epoch, step, train_loss, val_loss, val_dice_<region> per region of data.task
# (val_dice_wt/tc/et for BraTS, val_dice_tumour for binary), lr, seconds: the keys of a history row.
# Without validation cases the val_* columns are left out.


def train_one_epoch(run, loader, stop, progress, desc="train"):
    """Steps over the loader; `progress` ({"steps", "loss_sum", "count"}) carries a resumed partial epoch.
    Returns None when the loader is done, or early, with progress up to date: "stop" (a stop signal),
    "end" (train.max_steps or train.max_minutes reached) or "validate" (train.val_every steps done)."""
    run.model.train()
    tc = run.cfg.train
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        loss = train_step(run, batch)
        progress["steps"] += 1
        if loss is not None:
            progress["loss_sum"] += loss * len(batch["image"])
            progress["count"] += len(batch["image"])
        if distributed.broadcast_flag(stop.requested or out_of_time(run)):  # all ranks stop after the same step
            return "stop" if stop.requested else "end"
        if tc.max_steps and run.step >= tc.max_steps:
            return "end"
        if tc.val_every and run.step >= progress["val_due"]:
            return "validate"
    return None


def out_of_time(run):
    minutes = run.cfg.train.max_minutes
    return bool(minutes) and time.time() - run.started > minutes * 60


def train_round(run, train_set, position, stop):
    """Train from `position` ({"epoch", "steps" taken in it, "loss_sum", "count"}, updated) until a
    validation is due: the end of an epoch (train.val_every 0) or every train.val_every steps.
    Returns "validate", "end" (validate a last time: train.epochs, max_steps or max_minutes reached)
    or "stop" (a stop signal; the position stays where the signal found it)."""
    epochs, val_every = run.cfg.train.epochs, run.cfg.train.val_every
    # counted from the round's start, not as multiples of val_every: a re-fitted val_every
    # (refit_steps) would otherwise put the next validation anywhere from 1 step on
    if val_every and not position.get("val_due"):
        position["val_due"] = run.step + val_every
    while True:
        loader = epoch_loader(run, train_set, position["epoch"], position["steps"])
        epoch_batches = position["steps"] + len(loader)
        desc = f"epoch {position['epoch']}" + (f"/{epochs}" if epochs else "")
        reason = train_one_epoch(run, loader, stop, position, desc=desc)
        if reason == "stop":
            return reason
        if position["steps"] >= epoch_batches:  # the epoch is complete
            position.update(epoch=position["epoch"] + 1, steps=0)
            if epochs and position["epoch"] > epochs:
                return "end"
            reason = reason or (None if run.cfg.train.val_every else "validate")
        if reason:
            return reason


@torch.no_grad()
def validate(run, paths, cache):
    """(val_loss, {region: mean Dice}) over the validation cases `paths`, or None without cases.

    Each case is predicted, postprocessed and scored at its native grid by
    evaluation/ensemble.evaluate_case, as evaluate.py scores a test case (every eval.* key applies; no HD95); Dice comes from the
    case's voxel counts and is averaged over cases (slices mode: a case is a patient). val_loss is
    run.loss_fn on the case's native-grid probabilities (as logits, clamped at 1e-6) against its
    regions, averaged over cases. Under DDP each rank scores cases rank, rank + world, ... read
    through `cache` (a cases/cache.CaseCache) and the per-case figures are gathered, so every rank
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


def end_of_round(run, train_loss, validation, seconds, history):
    """Step the plateau scheduler and early stopping on a validation round's figures and log them;
    returns (history row, improved). Without validation (None) both follow the training loss."""
    if validation is None:
        improved, val, text = run.stopper.update(-train_loss), {}, ""
    else:
        val_loss, val_dice = validation
        improved = run.stopper.update(float(np.mean(list(val_dice.values()))))
        val = {"val_loss": round(val_loss, 5), **{f"val_dice_{n.lower()}": round(v, 4) for n, v in val_dice.items()}}
        text = f", val loss {val_loss:.4f}, val Dice " + " ".join(f"{n} {v:.3f}" for n, v in val_dice.items())
    if run.scheduler is not None:
        run.scheduler.step(train_loss if validation is None else validation[0])
    number = len(history) + 1  # an epoch, or a validation round under train.val_every
    log.info("%s %d: train loss %.4f%s%s (step %d, %.0fs)", "round" if run.cfg.train.val_every else "epoch",
             number, train_loss, text, " *best*" if improved else "", run.step, seconds)
    row = {"epoch": number, "step": run.step, "train_loss": round(train_loss, 5), **val,
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1)}
    return row, improved


def refit_steps(run, steps, train_seconds, val_seconds):
    """Re-fit a planned train.max_steps and train.val_every to the pace of the round just validated
    (`steps` optimizer steps in `train_seconds`, then a validation of `val_seconds`).

    The plan counted steps from a few seconds of timing before training, and the pace drifts as
    the machine's load does. After every round
    the steps left become what the rest of train.max_minutes buys at the last round's pace, keeping
    the number of validation rounds left, so the schedule reaches its end when the budget does.
    The new values go into run.cfg, which every checkpoint saves, so a resumed run keeps them."""
    tc = run.cfg.train
    rounds_left = math.ceil(max(tc.max_steps - run.step, 0) / max(tc.val_every, 1))  # the final one included
    if rounds_left == 0:
        return
    remaining = tc.max_minutes * 60 - (time.time() - run.started)
    # near the end keep validation to its share of what is left, not to the planned number of rounds
    rounds_left = min(rounds_left, max(1, int(PLANNER.val_share * remaining / max(val_seconds, 1e-6))))
    per_step = train_seconds / max(steps, 1)
    seconds_left = remaining - rounds_left * val_seconds
    total = run.step + max(int(seconds_left / per_step), rounds_left)
    total = int(distributed.broadcast_object(total))  # every rank follows rank 0's clock
    log.info("pace %.2f s a step, %.1f s a validation: train.max_steps %d -> %d", per_step, val_seconds,
             tc.max_steps, total)
    tc.max_steps = total
    tc.val_every = max(1, math.ceil((total - run.step) / rounds_left))


def checkpoint_state(run, history, position):
    """Everything needed to continue exactly: `epoch` is the last completed epoch; `partial` the
    position in the next one ({"epoch", "steps", "loss_sum", "count", "val_due": the step of the next
    validation under train.val_every}) when it has begun; `step` the optimizer steps taken (the
    schedule's clock)."""
    begun = position["steps"] or position["count"]
    return {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict(), "early_stopping": run.stopper.state_dict(),
            "epoch": position["epoch"] - 1, "step": run.step, "best_score": run.stopper.best,
            "config": to_dict(run.cfg), "history": history, "rng": rng_states(),
            "partial": dict(position) if begun else None}


def restore_state(run, state):
    """Load a checkpoint into the run's objects; returns (history, position)."""
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.stopper.best, run.stopper.bad_epochs = state["early_stopping"]["best"], state["early_stopping"]["bad_epochs"]
    run.step = int(state.get("step", 0))
    restore_rng_states(state["rng"])
    position = dict(state["partial"]) if state.get("partial") else new_progress(state["epoch"] + 1)
    log.info("resuming at epoch %d, step %d", position["epoch"], run.step)
    if not distributed.is_main():  # the saved loss of a begun round is the sum over ranks: count it once
        position.update(loss_sum=0.0, count=0)
    return list(state["history"]), position


def new_progress(epoch=1):
    return {"epoch": epoch, "steps": 0, "loss_sum": 0.0, "count": 0, "val_due": None}


def epoch_loader(run, train_set, epoch, skip_batches):
    """This rank's training batches of an epoch, skipping those a resumed partial epoch took."""
    train_set.set_epoch(epoch)
    return make_loader(train_set, run.cfg.train.batch_size,
                       num_workers=loader_workers(run.cfg.data.num_workers, run.device), seed=run.cfg.train.seed,
                       epoch=epoch, pin_memory=run.device.type == "cuda", skip_batches=skip_batches)


def round_train_loss(progress):
    """The mean training loss of a round over all ranks, and its (loss_sum, count) totals."""
    loss_sum, count = distributed.all_reduce_sum(
        torch.tensor([progress["loss_sum"], progress["count"]], dtype=torch.float64)).tolist()
    return loss_sum / max(count, 1), loss_sum, int(count)


def should_stop(run):
    """Early stopping, train.max_steps or train.max_minutes, agreed by all ranks (each reads its own clock)."""
    if distributed.broadcast_flag(run.stopper.should_stop):
        log.info("early stopping: no improvement for %d validations", run.cfg.train.patience)
        return True
    tc = run.cfg.train
    if distributed.broadcast_flag(out_of_time(run) or (tc.max_steps and run.step >= tc.max_steps)):
        log.info("stopping: %s reached", f"train.max_steps = {tc.max_steps}" if tc.max_steps and
                 run.step >= tc.max_steps else f"train.max_minutes = {tc.max_minutes:g}")
        return True
    return False


def fit(run, train_set, val_paths, run_dir, resume=None):
    """Train until train.epochs, early stopping (plateau schedule), train.max_steps, train.max_minutes
    (counted from run.started) or a stop signal, validating each epoch or every train.val_every steps.

    `run` is a training.step.Run (training.step.make_run), `val_paths` the validation case files, `resume` a loaded
    checkpoint to continue. Returns (path of best.pt, the signal number that stopped training or
    None). Under torchrun `run.model` is DDP-wrapped and every rank calls fit; rank 0 writes."""
    history, position = restore_state(run, resume) if resume else ([], new_progress())
    cache = CaseCache(case_format(run.cfg.data), run.cfg.data.cache_gb * 2 ** 30)  # validation cases
    if not val_paths:
        log.info("no validation cases (data.val_fraction 0): best.pt, the learning rate and early stopping "
                 "follow the training loss")
    with GracefulStop() as stop:
        while True:
            round_start, steps_before = time.time(), run.step
            reason = train_round(run, train_set, position, stop)
            train_loss, loss_sum, count = round_train_loss(position)
            if distributed.broadcast_flag(stop.requested):
                if distributed.is_main():
                    save_last(run_dir, checkpoint_state(run, history, dict(position, loss_sum=loss_sum, count=count)))
                distributed.barrier()
                return os.path.join(run_dir, "best.pt"), stop.signal or signal.SIGTERM  # or another rank's
            position.update(loss_sum=0.0, count=0, val_due=None)
            distributed.broadcast_buffers(run.model)  # batch norm statistics as rank 0 (and the checkpoint) has them
            val_start = time.time()
            validation = validate(run, val_paths, cache)
            if run.fit_steps_to_budget and reason != "end":
                refit_steps(run, run.step - steps_before, val_start - round_start, time.time() - val_start)
                if distributed.is_main():  # config.json is the config the checkpoints hold
                    write_json(os.path.join(run_dir, "config.json"), to_dict(run.cfg))
            row, improved = end_of_round(run, train_loss, validation, time.time() - round_start, history)
            history.append(row)
            if distributed.is_main():
                write_outputs(run, run_dir, history, position, improved)
            if reason == "end" or should_stop(run):
                break
    if distributed.is_main():  # a planned run's plan.json says how many of its steps were made
        record_made_steps(run_dir, run.step)
    distributed.barrier()  # best.pt is on disk before any rank goes on to evaluate it
    return os.path.join(run_dir, "best.pt"), None


def write_outputs(run, run_dir, history, position, improved):
    """last.pt, best.pt when the round improved (every round when train.ship keeps the final weights),
    metrics.csv and curves.png; rank 0 only."""
    state = checkpoint_state(run, history, position)
    if improved or ships_final_weights(run.cfg.train):
        save_checkpoint(os.path.join(run_dir, "best.pt"), state)
    save_last(run_dir, state)
    write_history(run_dir, history)
