"""Train a UNet and evaluate its best checkpoint on the held-out test split (on the validation cases
when the run takes no test split: cases.splits.take_test_split, docs/training.md#what-is-held-out).

    python main.py [--preset NAME] [--config FILE.json] [--section.key VALUE ...]

`--data.folds K --data.fold all` trains K cross-validation folds into RUN/fold_<i> and evaluates
their ensemble on the test split (docs/evaluation.md).
With no .h5 files in the default data.dir, a synthetic BraTS-like dataset is generated there first.
With train.max_minutes (and train.plan auto) the recipe is planned for that budget from the training
cases and a few seconds of measured steps (planning/); keys given explicitly win.
On several GPUs: `torchrun --nproc_per_node=N main.py ...` trains with DDP (see runtime/distributed.py).
"""
import argparse
import copy
import logging
import os
import signal
import sys
import time

import torch

from cases.h5 import DataError, case_format, case_id_of
from cases.splits import list_cases, make_split, validate_cases
from config import Config, build_config, check, explicit_keys, from_dict
from dataset import build_dataset
from evaluate import evaluate_checkpoint
from evaluation.postselect import choose_for_checkpoint, choose_for_folds
from evaluation.reports import format_table
from losses import DiceBCELoss
from model import build_model
from overrides import split_args
from planning.planner import make_plan
from runtime import distributed
from runtime.checkpoint import CheckpointError, load_resumable
from runtime.device import prepare_model, resolve_device
from runtime.seeding import seed_everything
from train import fit
from training.guards import TrainingStopped
from training.run_folder import (
    OutputError,
    check_free,
    load_split,
    on_main_rank,
    prepare_run_dir,
    read_split,
    resume_config,
    run_name,
)
from training.step import make_run

log = logging.getLogger("main")

# printed under the validation table of a run without a test split
NO_TEST_NOTE = ("{why}.\nThese validation figures are what this run can tell about accuracy; they are slightly "
                "optimistic, since these cases chose the postprocessing (and under train.ship best, best.pt). Score "
                "cases the run never saw with: python evaluate.py --checkpoint {best} --data.dir DIR --split all")


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


class Interrupted(Exception):
    """A stop signal ended training; last.pt in `run_dir` continues it (main.main exits 128 + signal)."""

    def __init__(self, signum, run_dir):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.run_dir = signum, run_dir


def asked_for_test(cfg, explicit):
    """Whether the user set data.test_fraction (then its test split is taken whatever its size); with
    `explicit` None, as for the planner, whether it is off its default."""
    if explicit is None:
        return cfg.data.test_fraction != Config().data.test_fraction
    return "data.test_fraction" in explicit


def split_cases(data_cfg, resume_dir=None, asked=False):
    """(split {"train", "val", "test": case ids, "held_out": why}, {"train": files, "val": files}): the
    saved split of the run in `resume_dir`, else a new one (deterministic: every rank computes the same
    split). `asked`: the user set data.test_fraction (cases.splits.take_test_split)."""
    paths = ensure_data(data_cfg)
    validate_cases(paths, case_format(data_cfg))
    ids = [case_id_of(p) for p in paths]
    split = load_split(resume_dir, paths) if resume_dir else make_split(ids, data_cfg, test_asked=asked)
    for part, why in split.get("held_out", {}).items():
        log.info("held out for %s: %s", part, why)
    by_id = {case_id_of(p): p for p in paths}
    return split, {part: [by_id[c] for c in split[part]] for part in ("train", "val")}


def make_training(cfg, model, device, started, fit_steps):
    """The step.Run that trains `model`: its fast paths (channels-last, compile) go on the bare module,
    before DDP wraps it. `fit_steps`: re-fit a planned train.max_steps to the real pace once it runs."""
    model = distributed.wrap_model(prepare_model(model, cfg.train, device), device,
                                   cfg.train.sync_batchnorm and cfg.model.norm == "batch")
    loss_fn = DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight, cfg.train.batch_dice)
    training = make_run(cfg, model, loss_fn, device)
    training.started, training.fit_steps_to_budget = started, fit_steps
    return training


def evaluate_best(best_path, val_paths, split, run_dir, device, *, planned=False, choose=True):
    """Choose postprocessing on the validation cases (unless not `choose`: cross-validation chooses on
    every fold's), then score best.pt on the test split, or on the validation cases when the run holds
    out no test cases, so the user always sees a figure; rank 0 lists the run's outputs (plan.json
    when `planned`)."""
    if choose:
        choose_for_checkpoint(best_path, val_paths, run_dir, device)
    part = "test" if split["test"] else "val"
    if split[part]:
        summary = evaluate_checkpoint(best_path, part, run_dir, device=device)  # sharded under DDP
        if distributed.is_main():
            print(format_table(summary))
            if part == "val":
                print(NO_TEST_NOTE.format(why=split.get("held_out", {}).get("test", "no test split"), best=best_path))
    if distributed.is_main():
        print(f"outputs in {run_dir}: config.json split.json {'plan.json ' if planned else ''}metrics.csv "
              f"curves.png last.pt best.pt" + (" summary.json per_case.csv" if split[part] else ""))


def train_and_evaluate(cfg, resume=None, explicit=None, choose=True):
    """Train (or continue `resume`, a (checkpoint path, state) pair) and evaluate the best checkpoint;
    returns the run folder. `explicit`: {key: value} the user set, which a plan keeps (default: every
    key off its default); `choose`: choose the postprocessing on this run's validation cases.
    Raises Interrupted when a stop signal ends training.

    Under torchrun every rank runs this; rank 0 alone creates and writes the run folder."""
    started = time.time()  # train.max_minutes counts the planning too
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    resume_dir = os.path.dirname(os.path.abspath(resume[0])) if resume else None
    split, files = split_cases(cfg.data, resume_dir, asked_for_test(cfg, explicit))
    device = resolve_device(cfg.train.device)
    # fixed input sizes (resize target, patch, window): let cuDNN pick its fastest kernels once
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.train.deterministic
    plan = None if resume else make_plan(cfg, explicit, files, device, started)
    if plan is not None:  # the planned run starts from the same random state as an unplanned one
        seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run_dir = on_main_rank(lambda: prepare_run_dir(cfg, split, resume_dir, n_params, plan),
                           OutputError("rank 0 could not prepare the run folder (its message says why)"))
    train_set = build_dataset(cfg.data, files["train"], seed=cfg.train.seed)
    # the plan's step count came from a few seconds of timing: fit it to the real pace once training runs
    fit_steps = plan is not None and "train.max_steps" in plan["values"] and "train.max_steps" not in (explicit or {})
    training = make_training(cfg, model, device, started, fit_steps)
    log.info("run %s: %d train / %d val / %d test cases, %s, %.2fM parameters", run_dir, len(split["train"]),
             len(split["val"]), len(split["test"]), device, n_params / 1e6)
    best_path, stopped_by = fit(training, train_set, files["val"], run_dir, resume[1] if resume else None)
    if stopped_by is not None:
        raise Interrupted(stopped_by, run_dir)
    evaluate_best(best_path, files["val"], split, run_dir, device, planned=plan is not None, choose=choose)
    return run_dir


def run_folds(cfg, explicit=None):
    """data.fold all: train fold 0..K-1 one after another, each a normal run in RUN/fold_<i>; choose the
    postprocessing once on every fold's validation cases pooled (each predicted by the fold that did not
    train on it: the cross-validation estimate); then evaluate the ensemble of their best.pt on the test
    split (which no fold trains or validates on), when there is one."""
    parent = os.path.join(cfg.train.out_dir, distributed.broadcast_object(run_name(cfg.train)))
    # every rank stops when the folder is taken, not only the one that looked
    on_main_rank(lambda: check_free(parent, cfg.train.overwrite),
                 FileExistsError(f"{parent}: run folder exists and is not empty; choose another --train.name "
                                 f"or pass --train.overwrite true"))
    fold_dirs = []
    for fold in range(cfg.data.folds):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold, fold_cfg.train.out_dir, fold_cfg.train.name = str(fold), parent, f"fold_{fold}"
        log.info("cross-validation: fold %d of %d", fold + 1, cfg.data.folds)
        fold_dirs.append(train_and_evaluate(fold_cfg, explicit=explicit, choose=False))
    if cfg.eval.choose_postprocessing:
        choose_on_every_fold(cfg, parent, fold_dirs)
    if read_split(os.path.join(parent, "fold_0"))["test"]:  # every fold holds out the same test cases
        summary = evaluate_checkpoint(parent, "test", parent)  # sharded under DDP
        if distributed.is_main():
            print(f"ensemble of {cfg.data.folds} folds:\n{format_table(summary)}")
    elif distributed.is_main():
        print(f"no test split: the folds' validation figures above ({parent}/fold_<i>/summary.json) are the "
              f"estimate; each case is validated by the one fold that did not train on it")
    return parent


def choose_on_every_fold(cfg, parent, fold_dirs):
    """The postprocessing chosen on the pooled out-of-fold predictions; rank 0 prints their figures."""
    by_id = {case_id_of(p): p for p in list_cases(cfg.data.dir)}
    runs = [(os.path.join(d, "best.pt"), [by_id[c] for c in read_split(d)["val"]]) for d in fold_dirs]
    report = choose_for_folds(runs, parent, resolve_device(cfg.train.device))
    if distributed.is_main():
        regions = report["result"]["dice"]
        print(f"cross-validation, {report['cases']} cases each predicted by the fold that did not train on it, "
              f"postprocessing {report['chosen']} chosen on all of them (postprocessing.json): mean Dice "
              + " ".join(f"{r} {v:.3f}" for r, v in regions.items()))


def configure(pairs, args):
    """(cfg, the keys the user set, resume) from the command line; resume is None or (checkpoint path,
    state), whose config is the checkpoint's with the harmless overrides given now."""
    cfg = build_config(pairs, args.preset, args.config)
    explicit = explicit_keys(cfg, pairs, args.preset, args.config)
    resume_from = args.resume or cfg.train.resume
    if not resume_from:
        return cfg, explicit, None
    path, state = load_resumable(resume_from)
    return resume_config(build_config(pairs, base=from_dict(state["config"])), state, path), explicit, (path, state)


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="named set of overrides from config.PRESETS")
    parser.add_argument("--config", default=None, help="JSON file of overrides, applied before the command line")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a run from its last.pt (same as --train.resume)")
    args = parser.parse_args(rest)
    # under torchrun only rank 0 logs progress; the others report warnings and errors only
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, explicit, resume = configure(pairs, args)
        check(cfg, warn=distributed.is_main())
        distributed.init_from_env(cfg.train.device)
        if cfg.data.folds and cfg.data.fold == "all" and not resume:
            run_folds(cfg, explicit)
        else:
            train_and_evaluate(cfg, resume, explicit)
    except Interrupted as stop:
        if distributed.is_main():
            print(f"{stop}; last.pt written. Continue with:\n  python main.py --resume {stop.run_dir}")
        sys.exit(128 + stop.signum)
    except (DataError, CheckpointError, KeyError, ValueError, FileExistsError, OutputError,
            TrainingStopped) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
