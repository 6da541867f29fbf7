"""Checkpoints: everything needed to continue a run, saved atomically and loaded safely.

A checkpoint holds only plain containers (dicts, lists, numbers, strings, tensors), so it loads
with `torch.load(weights_only=True)`: a file carrying any other pickled object is refused
instead of being executed.
"""
import os

import torch

from atomic import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def unwrap(model):
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, state):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-global errors all mean: do not use this file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a brats-unet checkpoint (no 'model' and 'config' entries)")
    return state


def load_weights(model, state, path="checkpoint"):
    """Load model weights, turning a shape mismatch into one clear line."""
    try:
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError as err:
        first = [line.strip() for line in str(err).splitlines() if line.strip()][1:2] or [str(err)]
        raise CheckpointError(f"{path}: weights do not fit the configured model ({first[0]})") from None
