"""Loading every checkpoint that evaluation and prediction use, a single model included: a -c /
--checkpoint argument names a file, a run folder's best.pt, or every fold_<i>/best.pt of a
cross-validation run, and each checkpoint becomes a Member rebuilt from its own stored config
(with the postprocessing chosen after training and the prediction-time overrides). Averaging
several members' probabilities is ensemble.py's.
"""
import os
import re
from dataclasses import dataclass

import torch

from config import Config, build_config, check
from evaluation.postselect import stored_config
from model import build_model
from runtime.checkpoint import CheckpointError, load_checkpoint, load_weights
from runtime.device import resolve_device
from runtime.precision import autocast_dtype

FOLD_DIR = re.compile(r"^fold_(\d+)$")
# what may change at prediction time: the model comes from the checkpoint
OVERRIDABLE = ("data.", "eval.", "train.device")


@dataclass
class Member:
    path: str                     # the checkpoint file
    model: torch.nn.Module        # on the device, in eval mode
    cfg: Config                   # the checkpoint's config with the prediction-time overrides
    amp_dtype: torch.dtype | None  # autocast dtype of its forward passes
    device: torch.device          # where the model is


def fold_checkpoints(run_dir):
    """best.pt of every fold_<i> of a cross-validation run folder, in fold order ([] if none)."""
    if not os.path.isdir(run_dir):
        return []
    folds = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := FOLD_DIR.match(name)))
    paths = [os.path.join(run_dir, name, "best.pt") for _, name in folds]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"{missing[0]}: checkpoint not found; every fold of {run_dir} needs its best.pt")
    return paths


def checkpoint_files(spec):
    """The checkpoint files a -c / --checkpoint argument names: a file; a run folder's best.pt;
    or the fold_<i>/best.pt of a cross-validation run folder."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isfile(os.path.join(spec, "best.pt")):
        return [os.path.join(spec, "best.pt")]
    folds = fold_checkpoints(spec)
    if folds:
        return folds
    if os.path.isdir(spec):
        raise CheckpointError(f"{spec}: run folder holds neither best.pt nor fold_<i>/best.pt")
    raise CheckpointError(f"{spec}: checkpoint not found")


def member_config(state, overrides, path):
    """A checkpoint's config with data.*, eval.* and train.device overrides, checked."""
    for key in overrides or {}:
        if not key.startswith(OVERRIDABLE):
            raise KeyError(f"--{key}: only data.*, eval.* and train.device can change at prediction "
                           f"(the model comes from the checkpoint {path})")
    # the postprocessing chosen after training (postselect) applies unless an override names the key
    return check(build_config(dict(overrides or {}), base=stored_config(state)))


def load_members(specs, device=None, overrides=None):
    """Every checkpoint the specs name, rebuilt from its own config on `device` (None: the first
    one's train.device); they must share a task and input channels, since their probabilities are
    averaged region by region."""
    members = []
    for spec in specs:
        for path in checkpoint_files(spec):
            state = load_checkpoint(path)
            cfg = member_config(state, overrides, path)
            device = device or resolve_device(cfg.train.device)
            model = build_model(cfg.model).to(device)
            load_weights(model, state, path)
            amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
            members.append(Member(path, model.eval(), cfg, amp_dtype, device))
    first = members[0].cfg.data
    for member in members[1:]:
        data = member.cfg.data
        if (data.task, data.channels) != (first.task, first.channels):
            raise CheckpointError(f"{member.path}: data.task {data.task!r} with {data.channels} channels cannot be "
                                  f"ensembled with {members[0].path} (data.task {first.task!r}, {first.channels} "
                                  f"channels)")
    return members
