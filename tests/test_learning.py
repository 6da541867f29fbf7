"""Training learns: 120 steps on tiny synthetic cases, whose labels each have their own intensities,
lift every region's validation and test Dice past FLOOR, in 3D (BraTS regions) and in 2D (slices,
binary task). FLOOR is out of reach of the same network untrained (train.lr 0), and of one whose
regions come out in another order: the cases are drawn so that any two regions overlap by Dice 0.6
at most (checked below), so a swapped region order, a broken loss target or a loss that ignores the
labels fails here although every score stays inside [0, 1].
"""
import csv
import json
import os

import numpy as np

import main
from cases.h5 import write_case
from conftest import paint

FLOOR = 0.75  # trained: 0.88-0.98 per region on three data seeds; untrained: below 0.1
# the labels of each region, written out here rather than read from the code under test
LABELS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
COMMON = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--data.num_workers", "0",
          "--data.val_fraction", "0.25", "--data.test_fraction", "0.25", "--train.batch_size", "2",
          "--train.epochs", "0", "--train.val_every", "60"]
LEARN = ["--train.lr", "1e-2", "--train.max_steps", "120"]
UNTRAINED = ["--train.lr", "0", "--train.max_steps", "1"]
SLICES = ["--data.mode", "slices", "--model.dims", "2", "--data.task", "binary", "--model.out_channels", "1",
          "--train.batch_size", "8"]


def tumour_case(rng, shape):
    """A brain ball holding a tumour ball (edema 2), its inner ball the core (necrosis 1) with the
    core's top cap enhancing (4): about 1/4 of the tumour is core and 1/4 of the core enhancing."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2
    brain = np.linalg.norm((grid - centre) / (np.array(shape) * 0.48), axis=-1) < 1
    tumour = centre + rng.uniform(-0.1, 0.1, 3) * np.array(shape)
    dist = np.linalg.norm(grid - tumour, axis=-1)
    radius = min(shape) * rng.uniform(0.25, 0.32)
    mask = np.zeros(shape, np.uint8)
    mask[dist < radius] = 2
    core = dist < radius * 0.63
    mask[core] = 1
    mask[core & (grid[..., 0] > tumour[0] + 0.19 * radius)] = 4
    return paint(mask, brain, rng), mask


def write_cases(folder, n_cases, shape, binary=False):
    rng = np.random.default_rng(0)
    masks = []
    for i in range(n_cases):
        image, mask = tumour_case(rng, shape)
        mask = (mask > 0).astype(np.uint8) if binary else mask
        write_case(os.path.join(folder, f"c{i:02d}.h5"), image, mask)
        masks.append(mask)
    return masks


def train(tmp_path, name, *args):
    """main.py on tmp_path/data; returns (the last metrics.csv row, {region: test Dice})."""
    main.main(["--data.dir", str(tmp_path / "data"), "--train.out_dir", str(tmp_path), "--train.name", name,
               *COMMON, *args])
    last = list(csv.DictReader(open(tmp_path / name / "metrics.csv")))[-1]
    test = json.load(open(tmp_path / name / "summary.json"))["regions"]
    return last, {region: scores["dice"] for region, scores in test.items()}


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_3d_training_beats_a_floor_no_untrained_or_region_swapped_network_reaches(tmp_path):
    masks = write_cases(str(tmp_path / "data"), 16, (16, 16, 16))
    regions = {name: [np.isin(m, labels) for m in masks] for name, labels in LABELS.items()}
    for a in LABELS:  # a network answering region b where region a is asked scores about this
        for b in set(LABELS) - {a}:
            assert np.mean([dice(x, y) for x, y in zip(regions[a], regions[b])]) < FLOOR - 0.15, (a, b)
    val, test = train(tmp_path, "trained", *LEARN)
    assert int(val["step"]) == 120
    for region in LABELS:
        assert float(val[f"val_dice_{region.lower()}"]) > FLOOR, val
        assert test[region] > FLOOR, test
    val, test = train(tmp_path, "untrained", *UNTRAINED)
    assert max(float(val[f"val_dice_{r.lower()}"]) for r in LABELS) < FLOOR - 0.5, val
    assert max(test.values()) < FLOOR - 0.5, test


def test_2d_slice_training_beats_the_floor_an_untrained_network_misses(tmp_path):
    write_cases(str(tmp_path / "data"), 12, (12, 16, 16), binary=True)
    val, test = train(tmp_path, "slices", *SLICES, *LEARN)
    assert float(val["val_dice_tumour"]) > FLOOR and test["tumour"] > FLOOR, (val, test)
    val, test = train(tmp_path, "untrained", *SLICES, *UNTRAINED)
    assert float(val["val_dice_tumour"]) < FLOOR - 0.5 and test["tumour"] < FLOOR - 0.5, (val, test)
