"""Checkpoints: everything needed to continue a run, saved atomically and loaded safely.

A checkpoint holds only plain containers (dicts, lists, numbers, strings, tensors), so it loads
with `torch.load(weights_only=True)`: a file carrying any other pickled object is refused
instead of being executed.
"""
import logging
import os
import random

import numpy as np
import torch

from runtime.atomic import atomic_path

log = logging.getLogger(__name__)


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


def rng_states():
    """Python, NumPy and torch RNG states as plain containers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def restore_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def save_last(run_dir, state):
    """Write last.pt, keeping the previous one as last.prev.pt so a damaged file never costs the run."""
    last, previous = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "last.prev.pt")
    if os.path.isfile(last):
        os.replace(last, previous)
    save_checkpoint(last, state)


def load_resumable(path):
    """Load a checkpoint to resume from; a run folder means its last.pt, falling back to last.prev.pt."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, "last.pt"), os.path.join(path, "last.prev.pt")]
    else:
        candidates = [path]
    errors = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            log.warning("%s; resuming from %s instead", errors[-1], candidate)
        return candidate, state
    raise CheckpointError("; ".join(errors))
