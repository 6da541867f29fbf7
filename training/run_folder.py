"""The run folder: created (or, resuming, reused) by rank 0, checked for room before training starts,
holding split.json, plan.json and config.json; and what a resumed run must agree with (its saved split
and its config)."""
import json
import logging
import os
import time

from cases.h5 import DataError, case_id_of
from cases.splits import PARTS, describe_grouping
from config import RESUME_SAFE_KEYS, diff_keys, from_dict, to_dict
from planning.report import write_plan
from runtime import distributed
from runtime.atomic import atomic_path, write_json

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The run folder cannot take the run's outputs."""


def run_name(train_cfg):
    """train.name, or the start time when it is empty."""
    return train_cfg.name or time.strftime("%Y%m%d-%H%M%S")


def check_free(run_dir, overwrite):
    """Refuse a run folder that already holds files, unless train.overwrite is on."""
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not overwrite:
        raise FileExistsError(f"{run_dir}: run folder exists and is not empty; choose another --train.name "
                              f"or pass --train.overwrite true")


def make_run_dir(train_cfg):
    """train.out_dir/<run_name>, created; a folder that holds files is refused (see check_free)."""
    run_dir = os.path.join(train_cfg.out_dir, run_name(train_cfg))
    check_free(run_dir, train_cfg.overwrite)
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


def prepare_run_dir(cfg, split, run_dir, n_params, plan=None):
    """Create (or, resuming, reuse) the run folder and write split.json, plan.json and config.json (after
    the plan, so evaluation rebuilds the planned model); rank 0 only."""
    if run_dir is None:
        run_dir = make_run_dir(cfg.train)
        ids = [c for part in PARTS for c in split[part]]
        folds = {"fold": int(cfg.data.fold), "folds": cfg.data.folds} if cfg.data.folds else {}
        write_json(os.path.join(run_dir, "split.json"), {**split, **folds, "grouping": describe_grouping(ids)})
    if plan is not None:
        write_plan(run_dir, {**plan, "held_out": held_out(split)})
    write_json(os.path.join(run_dir, "config.json"), to_dict(cfg))
    check_writable(run_dir, 3 * 4 * n_params)  # weights + Adam's two moments, fp32
    return run_dir


def on_main_rank(action, failure):
    """action() on rank 0, its result on every rank. When it raises FileExistsError or OutputError,
    rank 0 raises that and every other rank raises `failure`, so no rank waits alone in a collective."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = action()
        except (FileExistsError, OutputError) as err:
            error = err
    if distributed.broadcast_flag(error is not None):
        raise error or failure
    return distributed.broadcast_object(result)


def held_out(split):
    """plan.json's "held_out": how many cases each part has and why the test and validation parts
    were held out (split.json's "held_out"; absent in splits written before it existed)."""
    return {"cases": {part: len(split[part]) for part in PARTS}, **split.get("held_out", {})}


def read_split(run_dir):
    """A run's split.json as saved."""
    path = os.path.join(run_dir, "split.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the run's split ({err})") from None


def load_split(run_dir, paths):
    """The saved split of a run being resumed; its cases must all be in the data folder."""
    path = os.path.join(run_dir, "split.json")
    split = read_split(run_dir)
    missing = {c for part in PARTS for c in split[part]} - {case_id_of(p) for p in paths}
    if missing:
        raise DataError(f"{path}: {len(missing)} cases of the run's split are not in the data folder "
                        f"(e.g. {sorted(missing)[:3]})")
    return split


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
