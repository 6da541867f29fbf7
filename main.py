"""Train a UNet and evaluate its best checkpoint on the held-out test split.

    python main.py [--preset NAME] [--config FILE.json] [--section.key VALUE ...]

`--data.folds K --data.fold all` trains K cross-validation folds into RUN/fold_<i> and evaluates
their ensemble on the test split (docs/evaluation.md).
With no .h5 files in the default data.dir, a synthetic BraTS-like dataset is generated there first.
With train.max_minutes (and train.plan auto) the recipe is planned for that budget from the training
cases and a few seconds of measured steps (fingerprint.py, plan.py); keys given explicitly win.
On several GPUs: `torchrun --nproc_per_node=N main.py ...` trains with DDP (see distributed.py).
"""
import argparse
import copy
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from cases.h5 import DataError, case_format, case_id_of
from cases.splits import PARTS, describe_grouping, list_cases, make_split, validate_cases
from config import RESUME_SAFE_KEYS, Config, apply_dict, build_config, check, diff_keys, from_dict, to_dict
from dataset import build_dataset
from evaluate import evaluate_checkpoint
from evaluation.postselect import choose_for_checkpoint
from evaluation.reports import format_table
from losses import DiceBCELoss
from model import build_model
from overrides import explicit_keys, get_key, split_args
from planning.fingerprint import fingerprint
from planning.plan import plan_recipe
from planning.report import format_plan, write_plan
from planning.speed import BATCH_SIZE, measure_speed
from runtime import distributed
from runtime.atomic import atomic_path, write_json
from runtime.checkpoint import CheckpointError, load_resumable
from runtime.device import prepare_model, resolve_device
from runtime.precision import autocast_dtype
from train import fit
from training.guards import TrainingStopped
from training.step import make_run

log = logging.getLogger("main")

# Sample sides timed before planning (rounded to multiples of 2**model.depth), smallest first, near
# the sizes the planner weighs: 16-24^3 steps on a busy 2-core CPU were overhead and noise, and a
# line through them put a 64x80x64 step at 22 s (the issue measured ~1.2 s at 80x96x80). No
# further side is timed once SPEED_SECONDS have gone, so a slow or busy device stays near 5 s.
SPEED_SIDES = {"cpu": (32, 48, 64), "cuda": (64, 96, 128)}
SPEED_SECONDS = 8.0


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def ensure_data(data_cfg):
    """The case files; generates the synthetic set when the default folder holds none."""
    has_cases = os.path.isdir(data_cfg.dir) and any(f.endswith(".h5") for f in os.listdir(data_cfg.dir))
    if not has_cases and data_cfg.dir == Config().data.dir and distributed.is_main():
        from cases.synthetic import generate_dataset
        log.info("no data in %s: generating %d synthetic BraTS-like cases there", data_cfg.dir,
                 data_cfg.synthetic_cases)
        generate_dataset(data_cfg.dir, data_cfg.synthetic_cases, seed=data_cfg.split_seed)
    distributed.barrier()  # the other ranks list the folder once rank 0 has filled it
    return list_cases(data_cfg.dir)


def make_run_dir(train_cfg):
    name = train_cfg.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(train_cfg.out_dir, name)
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not train_cfg.overwrite:
        raise FileExistsError(f"{run_dir}: run folder exists and is not empty; choose another --train.name "
                              f"or pass --train.overwrite true")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{run_dir}: cannot create the run folder ({err.strerror})") from None
    return run_dir


def check_writable(folder, nbytes):
    """Write and delete a file as large as a checkpoint, so a read-only or full disk fails now,
    not after the first epoch."""
    probe = os.path.join(folder, ".write-test")
    try:
        with atomic_path(probe) as tmp, open(tmp, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"{folder}: cannot write outputs there ({err.strerror}); need about "
                          f"{nbytes / 2 ** 20:.0f} MiB free for each checkpoint") from None


class OutputError(RuntimeError):
    """The run folder cannot take the run's outputs."""


def resume_config(cfg, state, path):
    """The checkpoint's config with the harmless overrides given now; refuses result-changing ones."""
    saved = from_dict(state["config"])
    changed = diff_keys(saved, cfg)
    refused = [key for key in changed if key not in RESUME_SAFE_KEYS]
    if refused:
        raise ValueError(f"{path}: cannot resume with a config that changes the result: "
                         f"{', '.join(refused)} differ from the checkpoint (start a new run instead)")
    for key in changed:
        log.info("resume: %s changed (allowed)", key)
    return cfg


def run(cfg, resume=None, explicit=None):
    """Train (or continue `resume`, a (checkpoint path, state) pair) and evaluate the best checkpoint.
    `explicit`: {key: value} the user set, which a plan keeps (default: every key off its default).

    Under torchrun every rank runs this; rank 0 alone creates and writes the run folder."""
    started = time.time()  # train.max_minutes counts the planning too
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    paths = ensure_data(cfg.data)
    validate_cases(paths, case_format(cfg.data))
    device = resolve_device(cfg.train.device)
    # fixed input sizes (resize target, patch, window): let cuDNN pick its fastest kernels once
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.train.deterministic
    if resume:
        run_dir = os.path.dirname(os.path.abspath(resume[0]))
        split = load_split(run_dir, paths)
    else:  # deterministic: every rank computes the same split
        split = make_split([case_id_of(p) for p in paths], cfg.data)
    by_id = {case_id_of(p): p for p in paths}
    val_paths = [by_id[c] for c in split["val"]]  # validation reads whole cases, as evaluation does
    train_paths = [by_id[c] for c in split["train"]]
    plan = None if resume else make_plan(cfg, explicit, {"train": train_paths, "val": val_paths}, device, started)
    if plan is not None:  # the planned run starts from the same random state as an unplanned one
        seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    error = None
    if distributed.is_main():
        try:
            run_dir = prepare_run_dir(cfg, split, run_dir if resume else None, n_params, plan)
        except (FileExistsError, OutputError) as err:
            error = err
    if distributed.broadcast_flag(error is not None):  # every rank stops when rank 0 cannot write
        raise error or OutputError("rank 0 could not prepare the run folder (its message says why)")
    run_dir = distributed.broadcast_object(run_dir if distributed.is_main() else None)
    train_set = build_dataset(cfg.data, train_paths, True, cfg.train.seed)
    # fast paths (channels-last, compile) go on the bare module, before DDP wraps it
    model = distributed.wrap_model(prepare_model(model, cfg.train, device), device,
                                   cfg.train.sync_batchnorm and cfg.model.norm == "batch")
    log.info("run %s: %d train / %d val / %d test cases, %s, %.2fM parameters", run_dir, len(split["train"]),
             len(split["val"]), len(split["test"]), device, n_params / 1e6)
    loss_fn = DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight, cfg.train.batch_dice)
    training = make_run(cfg, model, loss_fn, device)
    training.started = started
    # the plan's step count came from a few seconds of timing: fit it to the real pace once training runs
    training.fit_steps_to_budget = plan is not None and "train.max_steps" in plan["values"] and \
        "train.max_steps" not in (explicit or {})
    best_path, stopped_by = fit(training, train_set, val_paths, run_dir, resume[1] if resume else None)
    if stopped_by is not None:
        if not distributed.is_main():
            sys.exit(128 + stopped_by)
        print(f"stopped by {signal.Signals(stopped_by).name}; last.pt written. Continue with:\n"
              f"  python main.py --resume {run_dir}")
        sys.exit(128 + stopped_by)
    choose_for_checkpoint(best_path, val_paths, run_dir, device)  # postprocessing, on the validation cases
    if split["test"]:
        summary = evaluate_checkpoint(best_path, "test", run_dir, device=device)  # sharded under DDP
        if distributed.is_main():
            print(format_table(summary))
    if not distributed.is_main():
        return run_dir
    print(f"outputs in {run_dir}: config.json split.json {'plan.json ' if plan else ''}metrics.csv curves.png "
          f"last.pt best.pt"
          + (" summary.json per_case.csv" if split["test"] else ""))
    return run_dir


def make_plan(cfg, explicit, paths, device, started):
    """Plan the recipe for what is left of train.max_minutes from the training cases' fingerprint and
    a short step timing on `device` in training's precision and layout; apply it to cfg (keys in
    `explicit` keep their values) and return it. None, cfg untouched, without a budget or with
    train.plan off. `paths`: {"train": files, "val": files}. Rank 0 plans, every rank applies."""
    if cfg.train.plan == "off" or cfg.train.max_minutes <= 0:
        return None
    if explicit is None:
        explicit = {key: get_key(cfg, key) for key in diff_keys(cfg, Config())}
    plan = None
    if distributed.is_main():
        fp = fingerprint(paths["train"], case_format(cfg.data), cfg.data.task)
        step = 2 ** cfg.model.depth
        sizes = sorted({(max(step, step * round(side / step)),) * 3 for side in SPEED_SIDES[device.type]})
        batch = BATCH_SIZE
        if cfg.model.dims == 2:  # slices: only the schedule is planned, timed at the configured slice and batch
            sizes, batch = [tuple(cfg.data.image_size)[-2:]], cfg.train.batch_size
        layout = dataclasses.replace(cfg.train, compile=False)  # channels-last as training; compiling takes minutes
        speed = measure_speed(cfg.model, device, sizes, batch, repeats=2, max_seconds=SPEED_SECONDS,
                              amp_dtype=autocast_dtype(device, cfg.train.amp, cfg.train.precision),
                              prepare=lambda model: prepare_model(model, layout, device))
        spent = (time.time() - started) / 60
        log.info("planning: fingerprint and speed measurement took %.1f s", spent * 60)
        left = max(cfg.train.max_minutes - spent, 0.01)  # all spent: a plan for a few steps, which time ends
        plan = plan_recipe(fp, round(left, 3), speed, json.loads(json.dumps(explicit)),
                           len(paths["val"]) or None)
    plan = distributed.broadcast_object(plan)
    apply_dict(cfg, plan["values"])
    check(cfg)
    if distributed.is_main():
        log.info("%s", format_plan(plan))
    return plan


def prepare_run_dir(cfg, split, run_dir, n_params, plan=None):
    """Create (or, resuming, reuse) the run folder and write split.json, plan.json and config.json (after
    the plan, so evaluation rebuilds the planned model); rank 0 only."""
    if run_dir is None:
        run_dir = make_run_dir(cfg.train)
        ids = [c for part in PARTS for c in split[part]]
        folds = {"fold": int(cfg.data.fold), "folds": cfg.data.folds} if cfg.data.folds else {}
        write_json(os.path.join(run_dir, "split.json"), {**split, **folds, "grouping": describe_grouping(ids)})
    if plan is not None:
        write_plan(run_dir, plan)
    write_json(os.path.join(run_dir, "config.json"), to_dict(cfg))
    check_writable(run_dir, 3 * 4 * n_params)  # weights + Adam's two moments, fp32
    return run_dir


def load_split(run_dir, paths):
    """The saved split of a run being resumed; its cases must all be in the data folder."""
    path = os.path.join(run_dir, "split.json")
    try:
        with open(path) as f:
            split = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the run's split ({err})") from None
    missing = {c for part in PARTS for c in split[part]} - {case_id_of(p) for p in paths}
    if missing:
        raise DataError(f"{path}: {len(missing)} cases of the run's split are not in the data folder "
                        f"(e.g. {sorted(missing)[:3]})")
    return split


def run_folds(cfg, explicit=None):
    """data.fold all: train fold 0..K-1 one after another, each a normal run in RUN/fold_<i>, then
    evaluate the ensemble of their best.pt on the test split (which no fold trains or validates on)."""
    name = distributed.broadcast_object(cfg.train.name or time.strftime("%Y%m%d-%H%M%S"))
    parent = os.path.join(cfg.train.out_dir, name)
    taken = distributed.is_main() and os.path.isdir(parent) and os.listdir(parent) and not cfg.train.overwrite
    if distributed.broadcast_flag(taken):  # every rank stops, not only the one that looked
        raise FileExistsError(f"{parent}: run folder exists and is not empty; choose another --train.name "
                              f"or pass --train.overwrite true")
    for fold in range(cfg.data.folds):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold, fold_cfg.train.out_dir, fold_cfg.train.name = str(fold), parent, f"fold_{fold}"
        log.info("cross-validation: fold %d of %d", fold + 1, cfg.data.folds)
        run(fold_cfg, explicit=explicit)
    if cfg.data.test_fraction > 0:
        summary = evaluate_checkpoint(parent, "test", parent)  # sharded under DDP
        if distributed.is_main():
            print(f"ensemble of {cfg.data.folds} folds:\n{format_table(summary)}")
    return parent


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="named set of overrides from overrides.PRESETS")
    parser.add_argument("--config", default=None, help="JSON file of overrides, applied before the command line")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a run from its last.pt (same as --train.resume)")
    args = parser.parse_args(rest)
    # under torchrun only rank 0 logs progress; the others report warnings and errors only
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = build_config(pairs, args.preset, args.config)
        explicit = explicit_keys(cfg, pairs, args.preset, args.config)
        resume_from = args.resume or cfg.train.resume
        resume = None
        if resume_from:
            path, state = load_resumable(resume_from)
            cfg = resume_config(build_config(pairs, base=from_dict(state["config"])), state, path)
            resume = (path, state)
        check(cfg, warn=distributed.is_main())
        distributed.init_from_env(cfg.train.device)
        if cfg.data.folds and cfg.data.fold == "all" and not resume:
            run_folds(cfg, explicit)
        else:
            run(cfg, resume, explicit)
    except (DataError, CheckpointError, KeyError, ValueError, FileExistsError, OutputError,
            TrainingStopped) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
