"""The training samples of each data.mode, served as tensors from per-case .h5 files.

A sample is {"image": (C, *size) float, "target": (R, *size) float, "case_id": str}, with one target
channel per region of data.task (WT/TC/ET for "brats", "tumour" for "binary").
ResizeDataset ("resize") serves whole cases resized to data.image_size; PatchDataset ("patch")
serves random data.patch_size patches read straight from the chunked HDF5 file (only the patch's
hyperslab is read), a share of them centred on tumour, or, when data.spacing is coarser than a
case's own, cut from the whole case resampled there once (kept within data.cache_gb); SliceDataset ("slices", model.dims 2)
serves 2D axial slices, sampled per case with a set share of tumour slices. They serve training
only: validation predicts whole cases at their native grid as evaluation does (evaluation/ensemble.py).
Files are opened lazily in whichever process asks for a sample (DataLoader workers included).
Augmentation randomness is a pure function of (seed, epoch, index), so a run's samples are the
same whatever the number of workers, and a resumed run sees the same samples as an unbroken one.
"""
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from cases.h5 import (
    DataError,
    as_labels,
    case_format,
    case_id_of,
    get_dataset,
    image_layout,
    open_case,
    read_box,
    read_case,
)
from transforms.augment import augment
from transforms.context import slice_with_context
from transforms.normalise import brain_stats, zscore, zscore_brain
from transforms.regions import labels_to_regions, task_regions
from transforms.resample import resample_image, resample_labels, resize_image, resize_labels, target_spacing

log = logging.getLogger(__name__)

MAX_FOREGROUND_POINTS = 10_000  # tumour voxels kept per case for centring patches (as nnU-Net does)


class H5Dataset(Dataset):
    """Samples drawn from a list of case files: how to read them, the sample's random generator and a
    cache of prepared cases (up to data.cache_gb), shared by the datasets of every mode."""

    def __init__(self, paths, data_cfg, *, seed=0):
        self.paths, self.cfg, self.seed = list(paths), data_cfg, seed
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
        """self.prepare(index) (a tuple of a case's tensors and facts), cached while data.cache_gb allows."""
        if index in self.cache:
            return self.cache[index]
        item = self.prepare(index)
        nbytes = sum(part.nbytes for part in item if isinstance(part, torch.Tensor))
        if self.cached_bytes + nbytes <= self.cfg.cache_gb * 2 ** 30:
            self.cache[index], self.cached_bytes = item, self.cached_bytes + nbytes
        return item

    def sample(self, image, mask, case_id, gen):
        """The sample dict, augmented with `gen` when data.augment is on."""
        if self.cfg.augment:
            image, mask = augment(image, mask, gen, self.cfg)
        return {"image": image, "target": labels_to_regions(mask, self.regions), "case_id": case_id}


class ResizeDataset(H5Dataset):
    """Whole cases, normalised and resized to data.image_size (resize mode)."""

    def prepare(self, index):
        case = read_case(self.paths[index], self.fmt)
        size = tuple(self.cfg.image_size)
        return resize_image(zscore_brain(case.image), size), resize_labels(torch.from_numpy(case.mask), size), \
            case.case_id

    def __getitem__(self, index):
        return self.sample(*self.prepared(index), self.generator(index))


def foreground_points(mask):
    """Tumour voxels of a label map (N, 3), at most MAX_FOREGROUND_POINTS of them, always the same ones."""
    points = np.argwhere(np.asarray(mask) > 0).astype(np.int32)
    if len(points) > MAX_FOREGROUND_POINTS:
        points = points[np.random.default_rng(0).choice(len(points), MAX_FOREGROUND_POINTS, replace=False)]
    return points


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


class PatchDataset(H5Dataset):
    """Random patches of data.patch_size from each case (patch mode), data.patches_per_case per epoch.

    Per worker and case it keeps the normalisation statistics (from attrs brain_mean/brain_std,
    else computed once from the whole volume) and up to MAX_FOREGROUND_POINTS tumour voxels.
    """

    def __init__(self, paths, data_cfg, *, seed=0):
        super().__init__(paths, data_cfg, seed=seed)
        self.per_case = max(1, int(data_cfg.patches_per_case))
        self._stats, self._foreground, self._targets = {}, {}, {}

    def target(self, index):
        """The spacing case `index` is resampled to (data.spacing coarser than its own), else None."""
        if not self.cfg.spacing:
            return None
        if index not in self._targets:
            with open_case(self.paths[index]) as f:
                native = tuple(float(s) for s in f.attrs.get("spacing", (1.0, 1.0, 1.0)))
            self._targets[index] = target_spacing(native, self.cfg.spacing)
        return self._targets[index]

    def prepare(self, index):
        """(image, mask, tumour voxels, case_id) of case `index`, normalised and resampled to target(index)."""
        case = read_case(self.paths[index], self.fmt)
        target = self.target(index)
        image = resample_image(zscore_brain(case.image), case.spacing, target)
        mask = resample_labels(case.mask, case.spacing, target)
        return image, mask, foreground_points(mask.numpy()), case.case_id

    def __len__(self):
        return len(self.paths) * self.per_case

    def _case_info(self, path, f):
        """(image dataset, channel axis, (mean, std), foreground points, spatial shape) of an open case."""
        dset = get_dataset(f, path, self.fmt.image_key)
        channel_axis, spatial = image_layout(dset, path, self.fmt)
        if path not in self._stats:
            self._stats[path] = self._brain_stats(path, f, dset, channel_axis)
        if path not in self._foreground:
            self._foreground[path] = foreground_points(self._mask(path, f, (0,) * 3, spatial, spatial))
        return dset, channel_axis, self._stats[path], self._foreground[path], spatial

    @staticmethod
    def _brain_stats(path, f, dset, channel_axis):
        if "brain_mean" in f.attrs and "brain_std" in f.attrs:
            return np.asarray(f.attrs["brain_mean"], np.float64), np.asarray(f.attrs["brain_std"], np.float64)
        log.info("%s: no brain_mean/brain_std attributes; computing them from the whole volume once", path)
        return brain_stats(np.moveaxis(dset[()], -1, 0) if channel_axis == -1 else dset[()])

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
        fraction = self.cfg.foreground_fraction
        if self.target(index % len(self.paths)) is not None:
            image, mask, foreground, case_id = self.prepared(index % len(self.paths))
            start, _ = patch_start(mask.shape, patch, foreground, fraction, gen)
            return self.sample(torch.from_numpy(read_box(image.numpy(), start, patch, 0)),
                               torch.from_numpy(read_box(mask.numpy(), start, patch)), case_id, gen)
        with open_case(path) as f:
            dset, channel_axis, stats, foreground, spatial = self._case_info(path, f)
            start, _ = patch_start(spatial, patch, foreground, fraction, gen)
            raw = read_box(dset, start, patch, channel_axis).astype(np.float32)
            mask = self._mask(path, f, start, patch, spatial)
        image = zscore(np.moveaxis(raw, -1, 0) if channel_axis == -1 else raw, *stats)
        return self.sample(image, torch.from_numpy(mask), case_id_of(path), gen)


def pick_slice(tumour, fraction, gen):
    """A slice index: with probability `fraction` one holding tumour, else one without (either at
    random); when a case has only one kind, any slice. `tumour` is a boolean per slice."""
    want_tumour = bool(torch.rand((), generator=gen) < fraction)
    pool = np.flatnonzero(tumour == want_tumour)
    if len(pool) == 0:
        pool = np.arange(len(tumour))
    return int(pool[int(torch.randint(len(pool), (), generator=gen))])


def slice_count(path, fmt):
    """Number of axial slices (D) of a case, read from the image's shape without loading it."""
    with open_case(path) as f:
        return image_layout(get_dataset(f, path, fmt.image_key), path, fmt)[1][0]


class SliceDataset(H5Dataset):
    """2D axial slices of each case (slices mode), resized to the last two axes of data.image_size.

    Each case is z-scored over its whole brain (as in 3D), so a slice's intensities do not depend
    on how much brain it cuts. It draws data.slices_per_case slices per case and epoch (0: as many
    as it has), a data.foreground_fraction share of them with tumour. With data.slice_context k, a
    sample's image holds slices z-k..z+k as (2k+1)*C channels (transforms/context.py; the edge slice
    repeats at the volume's edges).
    """

    def __init__(self, paths, data_cfg, *, seed=0):
        super().__init__(paths, data_cfg, seed=seed)
        depths = [slice_count(p, self.fmt) for p in self.paths]  # opens every case: a bad file fails here
        self.ends = np.cumsum([data_cfg.slices_per_case or d for d in depths])

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def prepare(self, index):
        """(image (C, D, h, w), mask (D, h, w), tumour per slice, case_id) of case `index`."""
        case = read_case(self.paths[index], self.fmt)
        # keeping D, a trilinear (nearest) resize is exactly a per-slice bilinear (nearest) one
        size = (case.mask.shape[0], *tuple(self.cfg.image_size)[-2:])
        image = resize_image(zscore_brain(case.image), size)
        mask = resize_labels(torch.from_numpy(case.mask), size)
        return image, mask, case.mask.reshape(len(case.mask), -1).any(1), case.case_id

    def __getitem__(self, index):
        case_index = int(np.searchsorted(self.ends, index, side="right"))
        image, mask, tumour, case_id = self.prepared(case_index)
        gen = self.generator(index)
        z = pick_slice(tumour, self.cfg.foreground_fraction, gen)
        return self.sample(slice_with_context(image, z, self.cfg.slice_context), mask[z], case_id, gen)


DATASETS = {"resize": ResizeDataset, "patch": PatchDataset, "slices": SliceDataset}  # by data.mode


def build_dataset(data_cfg, paths, *, seed=0):
    """The training dataset of data.mode over the case files `paths`."""
    return DATASETS[data_cfg.mode](paths, data_cfg, seed=seed)
