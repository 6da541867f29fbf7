"""Where a 2D (slices mode) training epoch's time goes, from a short run on real cases.

    python bench.py --2d --preset lgg2d --data.dir DIR [--steps 20] [--val-cases 3] [--threads 2] [--data.* ...]

`time_2d_epoch(cfg, steps, val_cases)` builds what main.py builds (split, training set, model, loss,
training.step.make_run) and times, apart:
  prepare     reading each training case and preparing it (z-score, resize), once per case: the first
              epoch's cost while the cases fit in data.cache_gb, every epoch's otherwise
  data        `steps` batches drawn through the training DataLoader from prepared cases (slice
              sampling, 2.5D stacking, augmentation, collation)
  step        training.step.train_step on those batches (forward, loss, backward, optimizer)
  validation  train.validate on `val_cases` validation cases (prediction at the training size,
              resizing back, scoring), with the cases already in memory, as from the second epoch on
and extrapolates one epoch: len(training set) / train.batch_size steps, every validation case.
Every part is timed twice: wall-clock seconds and this process's CPU seconds (all its threads),
which other processes on a shared machine disturb much less. It returns seconds per unit and each
part's share of a cached epoch, by both clocks; on a shared machine compare shares, not seconds.
bench.py can call it to report the 2D step.
"""
import logging
import math
import sys

import torch

from cases.cache import CaseCache
from cases.h5 import case_format, case_id_of
from cases.splits import list_cases, split_cases
from config import build_config, check
from dataset import build_dataset
from losses import DiceBCELoss
from model import build_model
from overrides import split_args
from runtime.device import resolve_device
from runtime.timing import timed
from train import validate
from training.loaders import make_loader
from training.step import make_run, train_step

log = logging.getLogger(__name__)


def split_paths(cfg):
    """{'train'|'val'|'test': [case paths]} of data.dir, split as main.py splits it."""
    paths = list_cases(cfg.data.dir)
    by_id = {case_id_of(p): p for p in paths}
    split = split_cases(list(by_id), cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    return {part: [by_id[c] for c in ids] for part, ids in split.items()}


def time_train_steps(run, train_set, steps):
    """({"data", "step"}: [wall, cpu] seconds, steps taken) over `steps` batches of epoch 1."""
    run.model.train()
    batches = iter(make_loader(train_set, run.cfg.train.batch_size, seed=run.cfg.train.seed, epoch=1))
    spent = {"data": [0.0, 0.0], "step": [0.0, 0.0]}
    for taken in range(steps):
        batch, *data_s = timed(next, batches, None)
        if batch is None:
            return spent, taken
        _, *step_s = timed(train_step, run, batch, device=run.device)
        for part, seconds in (("data", data_s), ("step", step_s)):
            spent[part] = [a + b for a, b in zip(spent[part], seconds)]
    return spent, steps


def time_2d_epoch(cfg, steps=20, val_cases=3, device=None):
    """Seconds (wall and CPU) per case, step and validation case of a slices-mode run, and the
    shares of a cached epoch by each clock."""
    if cfg.data.mode != "slices":
        raise ValueError(f"data.mode {cfg.data.mode}: bench2d times the 2D (slices mode) path; use bench.py")
    device = device or resolve_device(cfg.train.device)
    paths = split_paths(cfg)
    train_set = build_dataset(cfg.data, paths["train"], seed=cfg.train.seed)
    prepare = [sum(t) for t in zip(*(timed(train_set.prepared, i)[1:] for i in range(len(paths["train"]))))]
    torch.manual_seed(cfg.train.seed)
    run = make_run(cfg, build_model(cfg.model).to(device), DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight),
                   device)
    time_train_steps(run, train_set, 2)  # warm-up: first-call allocations and kernel choices
    spent, taken = time_train_steps(run, train_set, steps)
    val_paths = paths["val"][:max(1, val_cases)]
    cache = CaseCache(case_format(cfg.data), 2 ** 40)
    validate(run, val_paths, cache)  # reads the cases into memory, as the first epoch does
    _, *val_s = timed(validate, run, val_paths, cache)
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    result = {"steps_per_epoch": steps_per_epoch, "train_cases": len(paths["train"]), "val_cases": len(paths["val"])}
    for clock, i in (("wall", 0), ("cpu", 1)):
        per = {"prepare_s_per_case": prepare[i] / len(paths["train"]), "data_s_per_step": spent["data"][i] / taken,
               "step_s_per_step": spent["step"][i] / taken, "validation_s_per_case": val_s[i] / len(val_paths)}
        epoch = {"data": per["data_s_per_step"] * steps_per_epoch, "step": per["step_s_per_step"] * steps_per_epoch,
                 "validation": per["validation_s_per_case"] * len(paths["val"])}
        total = sum(epoch.values())
        result[clock] = {**per, "first_epoch_prepare_s": prepare[i], "cached_epoch_s": total,
                         "shares": {part: seconds / total for part, seconds in epoch.items()}}
    return result


def format_timing(timing):
    lines = [f"{timing['train_cases']} training cases, {timing['steps_per_epoch']} steps an epoch, "
             f"{timing['val_cases']} validation cases"]
    for clock in ("wall", "cpu"):
        t = timing[clock]
        shares = ", ".join(f"{part} {share:.0%}" for part, share in t["shares"].items())
        lines.append(f"{clock:>4}: per step data {t['data_s_per_step']:.3f}s, train_step {t['step_s_per_step']:.3f}s; "
                     f"validation {t['validation_s_per_case']:.2f}s a case; prepare {t['prepare_s_per_case']:.2f}s a "
                     f"case (first epoch only); cached epoch {t['cached_epoch_s']:.0f}s: {shares}")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    parser.add_argument("--val-cases", type=int, default=3, help="validation cases timed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = check(build_config(pairs, preset=args.preset))
    print(format_timing(time_2d_epoch(cfg, args.steps, args.val_cases)))


if __name__ == "__main__":
    main()
