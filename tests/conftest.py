"""Shared fixtures: tiny BraTS-like cases written in a temporary folder."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cases.h5 import Case, write_case  # noqa: E402


def blob_case(rng, shape, with_enhancing=True):
    """A 4-channel 'brain' ball with a nested tumour: edema 2, core 1, enhancing 4."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2
    brain = np.linalg.norm((grid - centre) / (np.array(shape) * 0.45), axis=-1) < 1
    tumour_centre = centre + rng.uniform(-0.15, 0.15, 3) * np.array(shape)
    dist = np.linalg.norm(grid - tumour_centre, axis=-1)
    radius = min(shape) * rng.uniform(0.15, 0.25)
    mask = np.zeros(shape, np.uint8)
    mask[(dist < radius) & brain] = 2
    mask[(dist < radius * 0.6) & brain] = 4 if with_enhancing else 1
    mask[(dist < radius * 0.3) & brain] = 1
    return paint(mask, brain, rng), mask


# mean intensity of each label in the four channels (FLAIR, T1, T1ce, T2-like), background 0
LABEL_MEANS = {0: (100, 200, 150, 120), 1: (250, 90, 60, 300), 2: (300, 120, 160, 320), 4: (260, 110, 500, 260)}


def paint(mask, brain, rng, noise=15):
    """A (4, *shape) float32 image: each label's LABEL_MEANS inside the brain plus Gaussian noise, 0 outside."""
    image = np.zeros((4, *mask.shape), np.float32)
    for label, mean in LABEL_MEANS.items():
        region = brain & (mask == label)
        for c in range(4):
            image[c][region] = mean[c] + rng.normal(0, noise, region.sum())
    return image


def write_blob_dataset(folder, n_cases=6, shape=(20, 24, 22), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_cases):
        image, mask = blob_case(rng, shape, with_enhancing=i % 3 != 2)
        paths.append(write_case(os.path.join(folder, f"case_{i:03d}.h5"), image, mask))
    return paths


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run tiny models on one thread: on 2 cores shared with other work, OpenMP barriers made
    a 32^3 training step of a base-4 UNet 40x slower with two threads than with one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dataset(tmp_path):
    folder = tmp_path / "data"
    write_blob_dataset(str(folder))
    return str(folder)


# A model whose answer is known, and the case it answers perfectly (scoring and validation tests).
SHAPE = (12, 14, 10)


class TumourDetector(torch.nn.Module):
    """Answers every region with "where channel 0 is bright": large logits on the tumour of
    `bright_case`, large negative ones elsewhere (the z-scored brain is below 0.5)."""

    def __init__(self, regions=3):
        super().__init__()
        self.regions, self.gain = regions, torch.nn.Parameter(torch.tensor(20.0))  # a weight for optimizers

    def forward(self, x):
        return (self.gain * x[:, :1] - 10).repeat(1, self.regions, *(1,) * (x.dim() - 2))


def bright_case(case_id="c0", with_mask=True, stray=False):
    """A 4-channel brain of ones with a bright (10) box of tumour, labelled 4 (so WT = TC = ET);
    `stray` adds a second, unlabelled bright voxel that only postprocessing removes."""
    image = np.zeros((4, *SHAPE), np.float32)
    image[:, 1:-1, 1:-1, 1:-1] = 1
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:8, 5:9, 3:7] = 4
    image[:, mask > 0] = 10
    if stray:
        image[:, 1, 1, 1] = 10
    return Case(case_id, image, mask if with_mask else None)
