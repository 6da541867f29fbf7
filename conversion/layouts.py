"""Readers for the layouts users arrive with; each turns one source case into a `Case` in the project layout.

Every layout has a `find_*` (source folder -> [(case_id, source)], a DataError when nothing matches)
and a `read_*` (one source -> Case: image float32 (C, D, H, W), mask uint8 in BraTS 2018-21 labels
or None, spacing in (D, H, W) order, attrs for write_case). They are pure: nothing is written here.

  brats          BraTS NIfTI case folders: conversion/nifti.py (find_brats, read_brats), built on the helpers here
  kaggle-slices  volume_<v>_slice_<s>.h5: image (240, 240, 4) float64, mask (240, 240, 3) one-hot NCR/ED/ET
  lgg            kaggle_3m/<patient>/<patient>_<n>.tif (256, 256, 3) + <patient>_<n>_mask.tif (0 or 255)
  h5             any per-case .h5 files, read through cases.h5.read_case with a CaseFormat

Shared here: the brain crop (crop_case), the image and label checks, the optional-import hint (require).
"""
import glob
import os
import re
from collections import defaultdict

import h5py
import numpy as np

from cases.geometry import brain_box
from cases.h5 import MODALITIES, Case, CaseFormat, DataError, read_case

EXTRA_HINT = "pip install -r requirements-extra.txt"
LGG_MODALITIES = ("pre-contrast", "flair", "post-contrast")
KAGGLE_SLICE = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
LGG_SLICE = re.compile(r"^(.+)_(\d+)\.tif$")


def nothing_found(src, what):
    """DataError for a folder that is missing, empty, or holds none of the expected files."""
    if not os.path.isdir(src):
        return DataError(f"{src}: folder does not exist")
    others = sorted(os.listdir(src))[:5]
    return DataError(f"{src}: no {what} found" + (f" (found e.g. {others})" if others else " (folder is empty)"))


def require(module, purpose):
    """Import an optional reader lazily, with an install hint when it is missing."""
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{purpose} needs {module}: {EXTRA_HINT}") from None


def crop_case(case, source):
    """Crop image and mask to the brain's bounding box, recording original_shape and crop_box."""
    box = brain_box(case.image, case.mask)
    if box is None:
        raise DataError(f"{source}: every channel is zero; no brain to convert")
    region = tuple(slice(start, stop) for start, stop in box)
    case.attrs.update(original_shape=list(case.image.shape[1:]), crop_box=box)
    case.image = np.ascontiguousarray(case.image[(slice(None), *region)])
    if case.mask is not None:
        case.mask = np.ascontiguousarray(case.mask[region])
    return case


def check_image(image, path):
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: image contains {np.count_nonzero(~np.isfinite(image))} NaN/Inf values")


def check_labels(mask, allowed, path, hint=""):
    values = np.unique(mask).tolist()
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise DataError(f"{path}: mask has label values {bad} outside {list(allowed)} (values present: "
                        f"{values}){hint}")


def find_kaggle_slices(src):
    """Group volume_<v>_slice_<s>.h5 files (anywhere under src) by volume, slices in numeric order."""
    volumes = defaultdict(list)
    for path in glob.glob(os.path.join(src, "**", "volume_*_slice_*.h5"), recursive=True):
        match = KAGGLE_SLICE.match(os.path.basename(path))
        if match:
            volumes[int(match.group(1))].append((int(match.group(2)), path))
    if not volumes:
        raise nothing_found(src, "Kaggle BraTS2020 slice files (volume_<v>_slice_<s>.h5)")
    return [(f"volume_{v}", sorted(volumes[v])) for v in sorted(volumes)]


def _read_slice(path):
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "mask") if k not in f]
            if missing:
                raise DataError(f"{path}: no dataset {missing[0]!r}; keys present: {sorted(f.keys())}")
            return np.asarray(f["image"]), np.asarray(f["mask"])
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err}); is the file truncated?") from None


def read_kaggle_volume(slices, crop=True, modalities=MODALITIES):
    """[(slice number, path)] of one volume -> Case; one-hot NCR/ED/ET masks become labels 1/2/4."""
    numbers = [n for n, _ in slices]
    first = slices[0][1]
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps:
        raise DataError(f"{first}: volume is missing slices {gaps[:10]}{' ...' if len(gaps) > 10 else ''}")
    images, masks = [], []
    for _, path in slices:
        image, mask = _read_slice(path)
        if image.ndim != 3 or image.shape[-1] != len(modalities):
            raise DataError(f"{path}: image has shape {image.shape}; expected (H, W, {len(modalities)})")
        if mask.shape != (*image.shape[:2], 3):
            raise DataError(f"{path}: mask has shape {mask.shape}; expected {(*image.shape[:2], 3)} "
                            f"(one-hot NCR, ED, ET) for image {image.shape}")
        if images and image.shape != images[0].shape:
            raise DataError(f"{path}: image shape {image.shape} differs from {first} {images[0].shape}")
        check_image(image, path)
        images.append(image)
        masks.append(_one_hot_to_labels(mask, path))
    image = np.moveaxis(np.stack(images).astype(np.float32), -1, 0)  # (D, H, W, C) -> (C, D, H, W)
    attrs = {"modalities": list(modalities), "source_format": "kaggle-slices", "label_convention": "2018"}
    case = Case(f"volume_{KAGGLE_SLICE.match(os.path.basename(first)).group(1)}", image, np.stack(masks),
                (1.0, 1.0, 1.0), attrs)
    return crop_case(case, first) if crop else case


def _one_hot_to_labels(mask, path):
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{path}: one-hot mask holds values {np.unique(mask).tolist()}; expected 0 and 1")
    overlap = np.count_nonzero(mask.sum(-1) > 1)
    if overlap:
        raise DataError(f"{path}: one-hot mask channels (NCR, ED, ET) overlap in {overlap} voxels")
    labels = np.zeros(mask.shape[:2], np.uint8)
    for channel, value in enumerate((1, 2, 4)):
        labels[mask[..., channel] > 0] = value
    return labels


def find_lgg(src):
    """Every folder under src holding <patient>_<n>_mask.tif files is one patient."""
    folders = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(src, "**", "*_mask.tif"), recursive=True)})
    if not folders:
        raise nothing_found(src, "LGG patient folders (<patient>_<n>.tif with <patient>_<n>_mask.tif)")
    return [(os.path.basename(os.path.normpath(f)), f) for f in folders]


def lgg_slices(folder):
    """[(n, image path, mask path)] in numeric slice order; a DataError when a slice lacks its mask."""
    slices = []
    for path in glob.glob(os.path.join(folder, "*.tif")):
        match = LGG_SLICE.match(os.path.basename(path))
        if not match or path.endswith("_mask.tif"):
            continue
        mask_path = path[:-len(".tif")] + "_mask.tif"
        if not os.path.exists(mask_path):
            raise DataError(f"{path}: no mask file {os.path.basename(mask_path)} beside it")
        slices.append((int(match.group(2)), path, mask_path))
    if not slices:
        raise nothing_found(folder, "LGG slice images (<patient>_<n>.tif)")
    return sorted(slices)


def _read_tif(path):
    tifffile = require("tifffile", "reading TIFF")
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as err:  # tifffile raises TiffFileError, ValueError, OSError... for bad files
        raise DataError(f"{path}: cannot be read as TIFF ({type(err).__name__}: {err})") from None


def read_lgg(folder):
    """One LGG patient -> Case: image (3, slices, 256, 256), mask label 1 where the TIFF mask is 255."""
    images, masks, numbers = [], [], []
    for number, image_path, mask_path in lgg_slices(folder):
        image, mask = _read_tif(image_path), _read_tif(mask_path)
        if image.ndim != 3 or image.shape[-1] != len(LGG_MODALITIES):
            raise DataError(f"{image_path}: image has shape {image.shape}; expected (H, W, 3)")
        mask = mask[..., 0] if mask.ndim == 3 else mask
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask has shape {mask.shape}, image has {image.shape[:2]}; they must match")
        if images and image.shape != images[0].shape:
            raise DataError(f"{image_path}: image shape {image.shape} differs from the patient's other slices "
                            f"{images[0].shape}")
        check_labels(mask, (0, 255), mask_path, "; LGG masks are 0 or 255")
        images.append(image)
        masks.append((mask == 255).astype(np.uint8))
        numbers.append(number)
    image = np.moveaxis(np.stack(images).astype(np.float32), -1, 0)
    # slice_numbers: each stored slice's <n> in its source file name, so predictions go back to <patient>_<n>
    attrs = {"modalities": list(LGG_MODALITIES), "source_format": "lgg-tiff", "slice_numbers": numbers}
    return Case(os.path.basename(os.path.normpath(folder)), image, np.stack(masks), (1.0, 1.0, 1.0), attrs)


KEPT_ATTRS = ("affine", "original_shape", "crop_box", "label_convention")


def find_h5(src):
    paths = sorted(glob.glob(os.path.join(src, "*.h5")))
    if not paths:
        raise nothing_found(src, ".h5 case files")
    return [(os.path.splitext(os.path.basename(p))[0], p) for p in paths]


def read_h5(path, fmt=None, with_mask=True):
    """A user's .h5 case (any keys, channel order, mask form, label set) -> Case in the project layout."""
    fmt = fmt or CaseFormat()
    case = read_case(path, fmt, with_mask=with_mask)
    channels = case.image.shape[0]
    modalities = case.attrs.get("modalities") or (list(MODALITIES) if channels == len(MODALITIES)
                                                   else [f"channel_{c}" for c in range(channels)])
    attrs = {k: case.attrs[k] for k in KEPT_ATTRS if k in case.attrs}
    attrs.update(modalities=list(modalities), source_format="h5")
    return Case(case.case_id, case.image, case.mask, case.spacing, attrs)


def label_set(text):
    """'0,1,2,4' -> (0, 1, 2, 4)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"labels {text!r}: expected integers, comma-separated") from None
