"""predict.py --mirror averages the model over every axis flip, so its answer becomes flip-equivariant:
the label map of a flipped case is the flipped label map of the case. An untrained network answers
differently on flipped inputs, which without --mirror shows in many voxels (checked too, so the
test cannot pass with the flag ignored)."""
import h5py
import numpy as np
import pytest
import torch

import predict
from cases.h5 import write_case
from config import build_config, to_dict
from conftest import blob_case
from model import build_model
from runtime.checkpoint import save_checkpoint

SHAPE = (16, 16, 16)


@pytest.fixture
def flipped_cases(tmp_path):
    """A case and its copies flipped along each axis, in one input folder."""
    image, mask = blob_case(np.random.default_rng(0), SHAPE)
    for name, axes in (("case", ()), ("flip_d", (0,)), ("flip_h", (1,)), ("flip_w", (2,))):
        flipped = np.flip(image, tuple(a + 1 for a in axes)) if axes else image
        write_case(str(tmp_path / "in" / f"{name}.h5"), np.ascontiguousarray(flipped), None)
    cfg = build_config({"data.image_size": "16", "model.base_channels": "4", "model.depth": "2"})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.head.bias.zero_()  # logits spread around 0: the threshold cuts through the volume
    path = str(tmp_path / "run" / "best.pt")
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0})
    return tmp_path, path


def predicted(tmp_path, checkpoint, out, *flags):
    predict.main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / out), "-c", checkpoint, "--no-overlays",
                  "--device", "cpu", *flags])
    maps = {}
    for name in ("case", "flip_d", "flip_h", "flip_w"):
        with h5py.File(tmp_path / out / f"{name}.h5") as f:
            maps[name] = f["mask"][()]
    return maps


def mismatches(maps):
    """Voxels where each flipped case's map differs from the flipped map of the case."""
    return [int((maps[name] != np.flip(maps["case"], axis)).sum())
            for axis, name in enumerate(("flip_d", "flip_h", "flip_w"))]


def test_mirror_makes_the_prediction_flip_equivariant(flipped_cases):
    tmp_path, checkpoint = flipped_cases
    plain = predicted(tmp_path, checkpoint, "plain")
    assert 0 < (plain["case"] > 0).mean() < 1                   # something, not everything, predicted
    assert min(mismatches(plain)) > 50, mismatches(plain)       # the bare network is not equivariant
    mirrored = predicted(tmp_path, checkpoint, "mirrored", "--mirror")
    # equal up to float rounding: the flipped case sums the same flips in another order, which could
    # move a voxel whose logit is within ~1e-6 of 0 across the threshold
    assert max(mismatches(mirrored)) <= 2, mismatches(mirrored)
    assert (mirrored["case"] != plain["case"]).any()
