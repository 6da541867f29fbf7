"""The training data: a folder of per-case .h5 files, split per case, served as tensors.

A sample is {"image": (C, *size) float, "target": (3, *size) float WT/TC/ET, "case_id": str}.
Files are opened lazily in whichever process asks for a sample (DataLoader workers included).
Augmentation randomness is a pure function of (seed, epoch, index), so a run's samples are the
same whatever the number of workers, and a resumed run sees the same samples as an unbroken one.
"""
import glob
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cases import BRATS_LABELS, CaseFormat, DataError, parse_label_map, read_case
from transforms import augment, labels_to_regions, resize_image, resize_labels, zscore_brain

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def case_format(data_cfg):
    """How to read the configured data: keys, channel order, labels."""
    return CaseFormat(image_key=data_cfg.image_key, mask_key=data_cfg.mask_key, channels=data_cfg.channels,
                      channel_last=data_cfg.channel_last, label_map=parse_label_map(data_cfg.label_map),
                      labels=BRATS_LABELS)


def list_cases(folder):
    """Sorted .h5 files in a folder; a clear error when there are none."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist")
    paths = sorted(glob.glob(os.path.join(folder, "*.h5")))
    if not paths:
        others = sorted(os.listdir(folder))[:5]
        raise DataError(f"{folder}: no .h5 case files found" + (f" (found e.g. {others})" if others else " (empty)"))
    return paths


def validate_cases(paths, fmt):
    """Read every case once before training, so a bad file stops the run before it starts."""
    for path in paths:
        read_case(path, fmt)


def split_cases(case_ids, val_fraction, test_fraction, seed):
    """Deterministic per-case split: {'train': [...], 'val': [...], 'test': [...]}, no id in two parts."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, round(len(ids) * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    if n_test + n_val >= len(ids):
        raise DataError(f"{len(ids)} cases are too few to hold out {n_val} for validation and {n_test} for "
                        f"test; lower data.val_fraction / data.test_fraction or add cases")
    shuffled = [ids[i] for i in order]
    return {"test": sorted(shuffled[:n_test]), "val": sorted(shuffled[n_test:n_test + n_val]),
            "train": sorted(shuffled[n_test + n_val:])}


class BratsDataset(Dataset):
    """Whole cases resized to data.image_size (resize mode), augmented when `train` is true."""

    def __init__(self, paths, data_cfg, train, seed=0):
        self.paths, self.cfg, self.train, self.seed = list(paths), data_cfg, train, seed
        self.fmt = case_format(data_cfg)
        self.epoch = 0
        self.cache, self.cached_bytes = {}, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.paths)

    def generator(self, index):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)

    def prepared(self, index):
        """Normalised, resized (image, mask, case_id) before augmentation, cached up to data.cache_gb."""
        if index in self.cache:
            return self.cache[index]
        case = read_case(self.paths[index], self.fmt)
        size = tuple(self.cfg.image_size)
        item = (resize_image(zscore_brain(case.image), size), resize_labels(torch.from_numpy(case.mask), size),
                case.case_id)
        nbytes = item[0].nbytes + item[1].nbytes
        if self.cached_bytes + nbytes <= self.cfg.cache_gb * 2 ** 30:
            self.cache[index], self.cached_bytes = item, self.cached_bytes + nbytes
        return item

    def __getitem__(self, index):
        image, mask, case_id = self.prepared(index)
        if self.train and self.cfg.augment:
            image, mask = augment(image, mask, self.generator(index), self.cfg)
        return {"image": image, "target": labels_to_regions(mask), "case_id": case_id}


def loader_workers(requested, device):
    """-1 picks: 0 on CPU (a worker competes with the step's threads for the same cores), else up to 4."""
    if requested >= 0:
        return requested
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def make_loader(dataset, batch_size, shuffle, num_workers, seed=0, epoch=0, pin_memory=False):
    """A DataLoader whose shuffling order is a pure function of (seed, epoch)."""
    order = torch.Generator().manual_seed(seed * 7919 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=order, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=False)
