"""The training data: a folder of per-case .h5 files, split per case, served as tensors.

A sample is {"image": (C, *size) float, "target": (R, *size) float, "case_id": str}, with one target
channel per region of data.task (WT/TC/ET for "brats", "tumour" for "binary").
Three training modes (data.mode): "resize" serves whole cases resized to data.image_size;
"patch" serves random data.patch_size patches read straight from the chunked HDF5 file (only
the patch's hyperslab is read), a share of them centred on tumour. Validation in patch mode
serves whole normalised cases for sliding-window prediction. "slices" serves 2D axial slices
(for model.dims 2): sampled per case with a set share of tumour slices in training, every
slice of every case in validation.
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
from torch.utils.data.distributed import DistributedSampler

from cases import (CaseFormat, DataError, as_labels, case_id_of, channel_first, get_dataset,
                   open_case, parse_label_map, read_case)
from transforms import augment, labels_to_regions, resize_image, resize_labels, task_labels, task_regions, zscore_brain

log = logging.getLogger(__name__)


def case_format(data_cfg):
    """How to read the configured data: keys, channel order, labels."""
    return CaseFormat(image_key=data_cfg.image_key, mask_key=data_cfg.mask_key, channels=data_cfg.channels,
                      channel_last=data_cfg.channel_last, label_map=parse_label_map(data_cfg.label_map),
                      labels=task_labels(data_cfg.task))


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
        self.regions = task_regions(data_cfg.task)
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
        return {"image": image, "target": labels_to_regions(mask, self.regions), "case_id": case_id}


def loader_workers(requested, device):
    """-1 picks: 0 on CPU (a worker competes with the step's threads for the same cores), else up to 4."""
    if requested >= 0:
        return requested
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def epoch_order(n, shuffle, seed, epoch):
    """The sample order of an epoch: a pure function of (seed, epoch), so a resumed run repeats it."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def shard_order(n, shuffle, seed, epoch, rank, world_size):
    """This rank's share of an epoch under DDP. Training (shuffle): torch's DistributedSampler with
    set_epoch, which pads with repeats so every rank takes the same number of steps (DDP needs it).
    Evaluation: cases i = rank, rank + world, ... with no padding, so nothing is counted twice."""
    if not shuffle:
        return list(range(rank, n, world_size))
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def make_loader(dataset, batch_size, shuffle, num_workers, seed=0, epoch=0, pin_memory=False, skip_batches=0,
                rank=0, world_size=1):
    """A DataLoader over the epoch's order (this rank's shard of it under DDP), skipping the batches
    a resumed partial epoch already took."""
    if world_size > 1:
        order = shard_order(len(dataset), shuffle, seed, epoch, rank, world_size)
    else:
        order = epoch_order(len(dataset), shuffle, seed, epoch)
    order = order[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False)


MAX_FOREGROUND_POINTS = 10_000  # tumour voxels kept per case for centring patches (as nnU-Net does)


def patch_start(shape, patch, foreground, fraction, gen):
    """Corner of a patch (may be negative or overhang where the volume is smaller: padded later).

    With probability `fraction` (and when the case has tumour) the patch is centred on a random
    tumour voxel of `foreground` (an (N, ndim) array), shifted to stay inside the volume; otherwise
    its position is uniform. A pure function of `gen`. Returns (start tuple, centred: bool).
    """
    centred = bool(torch.rand((), generator=gen) < fraction) and len(foreground) > 0
    if centred:
        centre = foreground[int(torch.randint(len(foreground), (), generator=gen))]
    start = []
    for axis, (size, width) in enumerate(zip(shape, patch)):
        low, high = min(0, size - width), max(0, size - width)
        if centred:
            start.append(int(np.clip(int(centre[axis]) - width // 2, low, high)))
        else:
            start.append(int(torch.randint(low, high + 1, (), generator=gen)))
    return tuple(start), centred


def read_box(dataset, start, patch, channel_axis=None):
    """The part of an HDF5 dataset inside the box [start, start + patch), zero-padded where the box
    leaves the volume; reads only that hyperslab. `channel_axis` 0 or -1 keeps that axis whole."""
    spatial = dataset.shape[1:] if channel_axis == 0 else dataset.shape[:-1] if channel_axis == -1 else dataset.shape
    src = tuple(slice(max(o, 0), min(o + w, s)) for o, w, s in zip(start, patch, spatial))
    dst = tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(src, start))
    if channel_axis == 0:
        src, dst, shape = (slice(None), *src), (slice(None), *dst), (dataset.shape[0], *patch)
    elif channel_axis == -1:
        src, dst, shape = (*src, slice(None)), (*dst, slice(None)), (*patch, dataset.shape[-1])
    else:
        shape = tuple(patch)
    out = np.zeros(shape, dataset.dtype)
    out[dst] = dataset[src]
    return out


class PatchDataset(BratsDataset):
    """Random patches of data.patch_size from each case (patch mode), data.patches_per_case per epoch.

    Per worker and case it caches the normalisation statistics (from attrs brain_mean/brain_std,
    else computed once from the whole volume) and up to MAX_FOREGROUND_POINTS tumour voxels.
    """

    def __init__(self, paths, data_cfg, train=True, seed=0):
        super().__init__(paths, data_cfg, train, seed)
        self.per_case = max(1, int(data_cfg.patches_per_case))
        self._stats, self._foreground = {}, {}

    def __len__(self):
        return len(self.paths) * self.per_case

    def _case_info(self, path, f):
        """(image dataset, channel axis, mean, std, foreground points, spatial shape) of an open case."""
        dset = get_dataset(f, path, self.fmt.image_key)
        # validate the layout on a zero-cost view of the shape, then read channel order from it
        moved = channel_first(np.broadcast_to(np.float32(0), dset.shape), path, self.fmt)
        channel_axis = -1 if moved.shape != tuple(dset.shape) else 0
        if path not in self._stats:
            self._stats[path] = self._brain_stats(path, f, dset, channel_axis)
        if path not in self._foreground:
            mask = self._mask(path, f, (0,) * 3, moved.shape[1:], moved.shape[1:])
            points = np.argwhere(mask > 0).astype(np.int32)
            if len(points) > MAX_FOREGROUND_POINTS:
                points = points[np.random.default_rng(0).choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
            self._foreground[path] = points
        return dset, channel_axis, *self._stats[path], self._foreground[path], moved.shape[1:]

    def _brain_stats(self, path, f, dset, channel_axis):
        if "brain_mean" in f.attrs and "brain_std" in f.attrs:
            return np.asarray(f.attrs["brain_mean"], np.float64), np.asarray(f.attrs["brain_std"], np.float64)
        log.info("%s: no brain_mean/brain_std attributes; computing them from the whole volume once", path)
        image = np.moveaxis(dset[()], -1, 0) if channel_axis == -1 else dset[()]
        values = [c[c != 0].astype(np.float64) for c in image]
        return (np.array([v.mean() if v.size else 0.0 for v in values]),
                np.array([v.std() if v.size else 1.0 for v in values]))

    def _mask(self, path, f, start, patch, spatial):
        dset = get_dataset(f, path, self.fmt.mask_key)
        if dset.ndim != 3:
            raise DataError(f"{path}: patch mode reads label-map masks (D, H, W); this mask has shape "
                            f"{dset.shape}; use data.mode resize or convert the mask to labels")
        if tuple(dset.shape) != tuple(spatial):
            raise DataError(f"{path}: mask has shape {dset.shape}, image spatial shape is {tuple(spatial)}")
        return as_labels(read_box(dset, start, patch), path, self.fmt, tuple(patch))

    def __getitem__(self, index):
        path, gen = self.paths[index % len(self.paths)], self.generator(index)
        patch = tuple(self.cfg.patch_size)
        with open_case(path) as f:
            dset, channel_axis, mean, std, foreground, spatial = self._case_info(path, f)
            fraction = self.cfg.foreground_fraction if self.train else 0.0
            start, _ = patch_start(spatial, patch, foreground, fraction, gen)
            raw = read_box(dset, start, patch, channel_axis).astype(np.float32)
            mask = self._mask(path, f, start, patch, spatial)
        raw = np.moveaxis(raw, -1, 0) if channel_axis == -1 else raw
        image = torch.from_numpy(normalise(raw, mean, std))
        mask = torch.from_numpy(mask)
        if self.train and self.cfg.augment:
            image, mask = augment(image, mask, gen, self.cfg)
        return {"image": image, "target": labels_to_regions(mask, self.regions), "case_id": case_id_of(path)}


def normalise(raw, mean, std):
    """Per-channel z-score with given brain statistics; background (0) stays 0, as in zscore_brain."""
    view = (-1,) + (1,) * (raw.ndim - 1)
    scaled = (raw - np.reshape(mean, view)) / np.maximum(np.reshape(std, view), 1e-8)
    return np.where(raw != 0, scaled, 0).astype(np.float32)


class CaseDataset(BratsDataset):
    """Whole cases at their native grid, normalised (patch-mode validation by sliding window)."""

    def __getitem__(self, index):
        case = read_case(self.paths[index], self.fmt)
        return {"image": zscore_brain(case.image), "target": labels_to_regions(case.mask, self.regions),
                "case_id": case.case_id}


def slice_size(data_cfg):
    """The 2D (H, W) slices are resized to: the last two axes of data.image_size."""
    return tuple(data_cfg.image_size)[-2:]


def slice_count(path, fmt):
    """Number of axial slices (D) of a case, read from the image's shape without loading it."""
    with open_case(path) as f:
        shape = get_dataset(f, path, fmt.image_key).shape
    return channel_first(np.broadcast_to(np.float32(0), shape), path, fmt).shape[1]


def pick_slice(tumour, fraction, gen):
    """A slice index: with probability `fraction` one holding tumour, else one without (either at
    random); when a case has only one kind, any slice. `tumour` is a boolean per slice."""
    want_tumour = bool(torch.rand((), generator=gen) < fraction)
    pool = np.flatnonzero(tumour == want_tumour)
    if len(pool) == 0:
        pool = np.arange(len(tumour))
    return int(pool[int(torch.randint(len(pool), (), generator=gen))])


class SliceDataset(BratsDataset):
    """2D axial slices of each case (slices mode), resized to the last two axes of data.image_size.

    Each case is z-scored over its whole brain (as in 3D), so a slice's intensities do not depend
    on how much brain it cuts. Training draws data.slices_per_case slices per case and epoch (0: as
    many as it has), a data.foreground_fraction share of them with tumour; validation serves every
    slice of every case in order.
    """

    def __init__(self, paths, data_cfg, train, seed=0):
        super().__init__(paths, data_cfg, train, seed)
        depths = [slice_count(p, self.fmt) for p in self.paths]
        per_case = [data_cfg.slices_per_case or d for d in depths] if train else depths
        self.ends = np.cumsum(per_case)

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def prepared(self, index):
        """(image (C, D, h, w), mask (D, h, w), tumour per slice, case_id), cached up to data.cache_gb."""
        if index in self.cache:
            return self.cache[index]
        case = read_case(self.paths[index], self.fmt)
        # keeping D, a trilinear (nearest) resize is exactly a per-slice bilinear (nearest) one
        size = (case.mask.shape[0], *slice_size(self.cfg))
        image = resize_image(zscore_brain(case.image), size)
        mask = resize_labels(torch.from_numpy(case.mask), size)
        item = (image, mask, case.mask.reshape(len(case.mask), -1).any(1), case.case_id)
        nbytes = image.nbytes + mask.nbytes
        if self.cached_bytes + nbytes <= self.cfg.cache_gb * 2 ** 30:
            self.cache[index], self.cached_bytes = item, self.cached_bytes + nbytes
        return item

    def __getitem__(self, index):
        case_index = int(np.searchsorted(self.ends, index, side="right"))
        image, mask, tumour, case_id = self.prepared(case_index)
        if self.train:
            gen = self.generator(index)
            z = pick_slice(tumour, self.cfg.foreground_fraction, gen)
        else:
            z = index - (int(self.ends[case_index - 1]) if case_index else 0)
        image, mask = image[:, z], mask[z]
        if self.train and self.cfg.augment:
            image, mask = augment(image, mask, gen, self.cfg)
        return {"image": image, "target": labels_to_regions(mask, self.regions), "case_id": case_id}


def build_datasets(data_cfg, train_paths, val_paths, seed=0):
    """(train set, validation set) for data.mode: resized cases, patches and whole cases, or slices."""
    if data_cfg.mode == "resize":
        return (BratsDataset(train_paths, data_cfg, train=True, seed=seed),
                BratsDataset(val_paths, data_cfg, train=False))
    if data_cfg.mode == "patch":
        return PatchDataset(train_paths, data_cfg, train=True, seed=seed), CaseDataset(val_paths, data_cfg, False)
    if data_cfg.mode == "slices":
        return SliceDataset(train_paths, data_cfg, train=True, seed=seed), SliceDataset(val_paths, data_cfg, False)
    raise ValueError(f"data.mode {data_cfg.mode!r}: choose 'resize', 'patch' or 'slices'")
