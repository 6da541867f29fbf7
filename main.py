"""Train a UNet and evaluate its best checkpoint on the held-out test split.

    python main.py [--preset NAME] [--config FILE.json] [--section.key VALUE ...]

With no .h5 files in the default data.dir, a synthetic BraTS-like dataset is generated there first.
"""
import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from atomic import write_json
from cases import DataError, case_id_of
from checkpoint import CheckpointError
from config import Config, build_config, split_args, to_dict
from dataset import build_datasets, case_format, list_cases, split_cases, validate_cases
from evaluate import evaluate_checkpoint, format_table
from losses import DiceBCELoss
from model import build_model
from train import fit, resolve_device
from transforms import task_regions

log = logging.getLogger("main")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_data(data_cfg):
    """The case files; generates the synthetic set when the default folder holds none."""
    has_cases = os.path.isdir(data_cfg.dir) and any(f.endswith(".h5") for f in os.listdir(data_cfg.dir))
    if not has_cases and data_cfg.dir == Config().data.dir:
        from synthetic import generate_dataset
        log.info("no data in %s: generating %d synthetic BraTS-like cases there", data_cfg.dir,
                 data_cfg.synthetic_cases)
        generate_dataset(data_cfg.dir, data_cfg.synthetic_cases, seed=data_cfg.split_seed)
    return list_cases(data_cfg.dir)


def make_run_dir(train_cfg):
    name = train_cfg.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(train_cfg.out_dir, name)
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not train_cfg.overwrite:
        raise FileExistsError(f"{run_dir}: run folder exists and is not empty; choose another --train.name "
                              f"or pass --train.overwrite true")
    os.makedirs(run_dir, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise PermissionError(f"{run_dir}: run folder is not writable")
    return run_dir


def run(cfg):
    seed_everything(cfg.train.seed)
    paths = ensure_data(cfg.data)
    validate_cases(paths, case_format(cfg.data))
    split = split_cases([case_id_of(p) for p in paths], cfg.data.val_fraction, cfg.data.test_fraction,
                        cfg.data.split_seed)
    run_dir = make_run_dir(cfg.train)
    write_json(os.path.join(run_dir, "config.json"), to_dict(cfg))
    write_json(os.path.join(run_dir, "split.json"), split)
    by_id = {case_id_of(p): p for p in paths}
    train_set, val_set = build_datasets(cfg.data, [by_id[c] for c in split["train"]],
                                        [by_id[c] for c in split["val"]], seed=cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model).to(device)
    log.info("run %s: %d train / %d val / %d test cases, %s, %.2fM parameters", run_dir, len(split["train"]),
             len(split["val"]), len(split["test"]), device, sum(p.numel() for p in model.parameters()) / 1e6)
    loss_fn = DiceBCELoss(cfg.train.dice_weight, cfg.train.bce_weight)
    best_path = fit(cfg, model, loss_fn, train_set, val_set, run_dir, device)
    if split["test"]:
        summary = evaluate_checkpoint(best_path, "test", run_dir, device=device)
        print(format_table(summary))
    print(f"outputs in {run_dir}: config.json split.json metrics.csv curves.png last.pt best.pt"
          + (" summary.json per_case.csv" if split["test"] else ""))
    return run_dir


def check_task(cfg):
    """The model must fit the task: one output per region, 2D exactly when the data are slices."""
    regions = task_regions(cfg.data.task)
    if cfg.model.out_channels != len(regions):
        raise ValueError(f"model.out_channels ({cfg.model.out_channels}) must equal the {len(regions)} regions of "
                         f"data.task {cfg.data.task} ({', '.join(regions)})")
    if (cfg.model.dims == 2) != (cfg.data.mode == "slices"):
        raise ValueError(f"model.dims {cfg.model.dims} does not fit data.mode {cfg.data.mode}: 2D models train "
                         f"on data.mode slices, 3D models on resize or patch")


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="named set of overrides from config.PRESETS")
    parser.add_argument("--config", default=None, help="JSON file of overrides, applied before the command line")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = build_config(pairs, args.preset, args.config)
        if cfg.model.in_channels != cfg.data.channels:
            raise ValueError(f"model.in_channels ({cfg.model.in_channels}) must equal data.channels "
                             f"({cfg.data.channels})")
        check_task(cfg)
        run(cfg)
    except (DataError, CheckpointError, KeyError, ValueError, FileExistsError, PermissionError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")


if __name__ == "__main__":
    main()
