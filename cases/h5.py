"""One case on disk: read, validate and write the project's HDF5 layout.

The project layout (one file per case):
  image  float32 (C, D, H, W), chunked (1, 32, 32, 32), gzip level 1 with byte shuffle
  mask   uint8   (D, H, W), BraTS 2018-21 labels {0, 1, 2, 4}; absent for unlabelled cases
  attrs  modalities (list of str), spacing (3 floats, mm, in (D, H, W) order), brain_mean and
         brain_std (per channel, over non-zero voxels: patch reads normalise without loading the
         whole volume), and where known: affine (4x4 NIfTI affine of the source), original_shape
         (3 ints) and crop_box (3 x [start, stop]) into that original grid.

Axis order: D is the slice (axial) axis. NIfTI arrays (X, Y, Z) are stored transposed to (Z, Y, X);
original_shape and crop_box are in the stored (D, H, W) order, so a prediction is put back by
un-cropping into original_shape and transposing (2, 1, 0) before writing it with the source affine.

Readers also accept the generic layouts users already have (other key names, channel-last
images, one-hot masks, other label sets) through `CaseFormat`, so no conversion is needed.
Every problem is raised as `DataError` with the file name and what is wrong.
"""
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from config import TASK_REGIONS
from runtime.atomic import atomic_path
from transforms.normalise import brain_stats

BRATS_LABELS = (0, 1, 2, 4)
MODALITIES = ("flair", "t1", "t1ce", "t2")
# (1, 32, 32, 32) chunks, gzip level 1 after a byte shuffle: on real BraTS cases this read a random
# 128^3 patch faster than lzf or 64^3 / (C, 32^3) chunks, in files about as small as any (7-10x under
# raw); gzip also opens in any HDF5 tool, lzf only through h5py. Numbers in docs/data.md.
CHUNK = 32
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass
class CaseFormat:
    """How to read a user's .h5 file (defaults: the project layout)."""
    image_key: str = "image"
    mask_key: str = "mask"
    channels: int = 4              # expected image channels
    channel_last: str = "auto"     # "auto" | "true" | "false"
    label_map: dict = field(default_factory=dict)  # e.g. {3: 4} for BraTS 2023 labels
    labels: tuple = BRATS_LABELS   # label values allowed after mapping


@dataclass
class Case:
    case_id: str
    image: np.ndarray            # float32 (C, D, H, W)
    mask: np.ndarray | None      # uint8 (D, H, W) or None when unlabelled
    spacing: tuple = (1.0, 1.0, 1.0)
    attrs: dict = field(default_factory=dict)


def parse_label_map(text):
    """'3:4' or '3:4,5:2' -> {3: 4, 5: 2}."""
    mapping = {}
    for pair in filter(None, text.replace(" ", "").split(",")):
        src, sep, dst = pair.partition(":")
        if not sep or not src.lstrip("-").isdigit() or not dst.isdigit():
            raise ValueError(f"data.label_map {text!r}: expected pairs like 3:4, comma-separated")
        mapping[int(src)] = int(dst)
    return mapping


def case_format(data_cfg):
    """How to read the configured data: keys, channel order, label renaming, and the labels data.task
    allows (background and every label of its regions)."""
    labels = {0, *(label for region in TASK_REGIONS[data_cfg.task].values() for label in region)}
    return CaseFormat(image_key=data_cfg.image_key, mask_key=data_cfg.mask_key, channels=data_cfg.channels,
                      channel_last=data_cfg.channel_last, label_map=parse_label_map(data_cfg.label_map),
                      labels=tuple(sorted(labels)))


def case_id_of(path):
    return os.path.splitext(os.path.basename(path))[0]


def open_case(path):
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err}); is the file truncated or not .h5?") from None


def get_dataset(f, path, key, alternatives=()):
    for k in (key, *alternatives):
        if k in f:
            return f[k]
    raise DataError(f"{path}: no dataset '{key}'; keys present: {sorted(f.keys())} "
                    f"(set data.image_key / data.mask_key to read other names)")


def _array(dataset, path, dtype=None):
    """Load a whole dataset; a damaged chunk (a file cut short mid-copy) becomes a DataError."""
    try:
        return np.asarray(dataset, dtype=dtype)
    except OSError as err:
        raise DataError(f"{path}: dataset '{dataset.name.lstrip('/')}' cannot be read ({err}); "
                        f"is the file truncated or corrupt?") from None


def channel_first(image, path, fmt):
    """Return the image as (C, D, H, W), moving a trailing channel axis first when asked or obvious."""
    if image.ndim != 4:
        raise DataError(f"{path}: image has shape {image.shape}; expected 4 dimensions (C, D, H, W) "
                        f"or (D, H, W, C)")
    first, last = image.shape[0] == fmt.channels, image.shape[-1] == fmt.channels
    if fmt.channel_last == "true" or (fmt.channel_last == "auto" and last and not first):
        image = np.moveaxis(image, -1, 0)
    elif fmt.channel_last == "auto" and first and last:
        raise DataError(f"{path}: image shape {image.shape} is ambiguous (both first and last axis have "
                        f"{fmt.channels} channels); set data.channel_last true or false")
    if image.shape[0] != fmt.channels:
        raise DataError(f"{path}: image has {image.shape[0]} channels (shape {image.shape}); "
                        f"the config expects {fmt.channels} (data.channels)")
    return image


def image_layout(dataset, path, fmt):
    """(channel axis: 0 or -1, spatial shape) of an image dataset, validated as read_case validates
    it but from its shape alone, reading no voxels."""
    moved = channel_first(np.broadcast_to(np.float32(0), dataset.shape), path, fmt)
    return (-1 if moved.shape != tuple(dataset.shape) else 0), moved.shape[1:]


def read_box(dataset, start, size, channel_axis=None):
    """The part of an HDF5 dataset inside the box [start, start + size), zero-padded where the box
    leaves the volume; reads only that hyperslab. `channel_axis` 0 or -1 keeps that axis whole."""
    spatial = dataset.shape[1:] if channel_axis == 0 else dataset.shape[:-1] if channel_axis == -1 else dataset.shape
    src = tuple(slice(max(o, 0), min(o + w, s)) for o, w, s in zip(start, size, spatial))
    dst = tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(src, start))
    if channel_axis == 0:
        src, dst, shape = (slice(None), *src), (slice(None), *dst), (dataset.shape[0], *size)
    elif channel_axis == -1:
        src, dst, shape = (*src, slice(None)), (*dst, slice(None)), (*size, dataset.shape[-1])
    else:
        shape = tuple(size)
    out = np.zeros(shape, dataset.dtype)
    out[dst] = dataset[src]
    return out


def as_labels(mask, path, fmt, spatial):
    """Turn a label map or a one-hot/multi-channel mask into a uint8 label map in BraTS labels."""
    if mask.ndim == 4:  # one-hot NCR/ED/ET (channel-first or channel-last) -> labels 1/2/4
        if mask.shape[-1] in (3, 4) and mask.shape[:3] == spatial:
            mask = np.moveaxis(mask, -1, 0)
        if mask.shape[1:] != spatial:
            raise DataError(f"{path}: one-hot mask has shape {mask.shape}; image spatial shape is {spatial}")
        if mask.shape[0] == 4:  # background channel first
            mask = mask[1:]
        hot = mask > 0
        if (hot.sum(0) > 1).any():
            raise DataError(f"{path}: one-hot mask channels overlap in {(hot.sum(0) > 1).sum()} voxels")
        labels = np.zeros(spatial, np.uint8)
        for channel, value in zip(hot, (1, 2, 4)):
            labels[channel] = value
        return labels
    if mask.shape != spatial:
        raise DataError(f"{path}: mask has shape {mask.shape}, image spatial shape is {spatial}; they must match")
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise DataError(f"{path}: mask holds non-integer values; expected a label map")
    values = np.unique(mask)
    mapped = mask.astype(np.int64)
    for src, dst in fmt.label_map.items():
        mapped[mask == src] = dst
    bad = sorted(set(np.unique(mapped).tolist()) - set(fmt.labels))
    if bad:
        raise DataError(f"{path}: mask has label values {bad} outside {list(fmt.labels)} "
                        f"(values present: {values.tolist()}; BraTS 2023 uses 3 for enhancing: "
                        f"set data.label_map 3:4)")
    return mapped.astype(np.uint8)


def read_case(path, fmt=None, with_mask=True):
    """Read and validate one case file. Raises DataError naming the file and the problem."""
    fmt = fmt or CaseFormat()
    with open_case(path) as f:
        image = channel_first(_array(get_dataset(f, path, fmt.image_key), path, np.float32), path, fmt)
        if min(image.shape[1:]) == 0:
            raise DataError(f"{path}: image has zero size {image.shape}")
        if not np.all(np.isfinite(image)):
            raise DataError(f"{path}: image contains {np.count_nonzero(~np.isfinite(image))} NaN/Inf values")
        mask = None
        if with_mask:
            mask = as_labels(_array(get_dataset(f, path, fmt.mask_key), path), path, fmt, image.shape[1:])
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
    spacing = tuple(float(s) for s in attrs.get("spacing", (1.0, 1.0, 1.0)))
    return Case(case_id_of(path), image, mask, spacing, attrs)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def write_case(path, image, mask=None, spacing=(1.0, 1.0, 1.0), modalities=MODALITIES, **attrs):
    """Write one case in the project layout, atomically (temporary file in the same folder, then rename)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"{path}: image must be (C, D, H, W), got {image.shape}")
    if mask is not None and tuple(mask.shape) != image.shape[1:]:
        raise ValueError(f"{path}: mask shape {mask.shape} does not match image {image.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunks = (1, *(min(CHUNK, s) for s in image.shape[1:]))
        f.create_dataset("image", data=image, chunks=chunks, **COMPRESSION)
        if mask is not None:
            f.create_dataset("mask", data=np.asarray(mask, np.uint8), chunks=chunks[1:], **COMPRESSION)
        f.attrs["modalities"] = list(modalities)
        f.attrs["spacing"] = np.asarray(spacing, np.float64)
        f.attrs["brain_mean"], f.attrs["brain_std"] = brain_stats(image)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value if isinstance(value, str) else np.asarray(value)
    return path
