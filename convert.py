"""Readers for the layouts users arrive with; each turns one source case into a `Case` in the project layout.

Every layout has a `find_*` (source folder -> [(case_id, source)], a DataError when nothing matches)
and a `read_*` (one source -> Case: image float32 (C, D, H, W), mask uint8 in BraTS 2018-21 labels
or None, spacing in (D, H, W) order, attrs for write_case). They are pure: nothing is written here.

  brats          <case>/<case>_{flair,t1,t1ce,t2,seg}.nii(.gz) (2018-21, labels 0/1/2/4) or
                 <case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz (2023+, labels 0/1/2/3, 3 = enhancing)
  kaggle-slices  volume_<v>_slice_<s>.h5: image (240, 240, 4) float64, mask (240, 240, 3) one-hot NCR/ED/ET
  lgg            kaggle_3m/<patient>/<patient>_<n>.tif (256, 256, 3) + <patient>_<n>_mask.tif (0 or 255)
  h5             any per-case .h5 files, read through cases.read_case with a CaseFormat

NIfTI arrays (X, Y, Z) are transposed to (Z, Y, X), as cases.py documents; `cases.to_original_grid` undoes
the crop and the transpose so a prediction can be written back with the source affine.
"""
import glob
import logging
import os
import re
from collections import defaultdict

import h5py
import numpy as np

from cases import MODALITIES, Case, CaseFormat, DataError, read_case

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install -r requirements-extra.txt"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# File-name suffix -> project channel, per BraTS naming convention. Channels are always stored in
# the project order (flair, t1, t1ce, t2), so a model trained on one convention reads the other.
BRATS_NAMING = {
    "2018": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "2023": {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"},
}
SEG_LABELS = {"2018": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}
LGG_MODALITIES = ("pre-contrast", "flair", "post-contrast")
KAGGLE_SLICE = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
LGG_SLICE = re.compile(r"^(.+)_(\d+)\.tif$")


def _nothing_found(src, what):
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


# ---------------------------------------------------------------------------------------------- crop

def brain_box(image, mask=None):
    """[[start, stop]] per spatial axis of the voxels non-zero in any channel (or labelled in mask)."""
    occupied = np.any(image != 0, axis=0)
    if mask is not None:
        occupied |= mask != 0
    if not occupied.any():
        return None
    box = []
    for axis in range(occupied.ndim):
        hits = np.flatnonzero(occupied.any(axis=tuple(a for a in range(occupied.ndim) if a != axis)))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


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


def _check_image(image, path):
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: image contains {np.count_nonzero(~np.isfinite(image))} NaN/Inf values")


def _check_labels(mask, allowed, path, hint=""):
    values = np.unique(mask).tolist()
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise DataError(f"{path}: mask has label values {bad} outside {list(allowed)} (values present: "
                        f"{values}){hint}")


# --------------------------------------------------------------------------------------- BraTS NIfTI

def _strip_nifti(name):
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return None


def find_brats(src):
    """Every folder under src holding NIfTI files is one case, named after its folder."""
    folders = sorted({os.path.dirname(p) for suffix in NIFTI_SUFFIXES
                      for p in glob.glob(os.path.join(src, "**", f"*{suffix}"), recursive=True)})
    if not folders:
        raise _nothing_found(src, "BraTS case folders (*.nii.gz / *.nii files)")
    return [(os.path.basename(os.path.normpath(f)), f) for f in folders]


def brats_files(folder):
    """{'flair': path, ..., 'seg': path or None} and the naming convention ('2018' or '2023')."""
    files = {}
    for name in sorted(os.listdir(folder)):
        stem = _strip_nifti(name)
        if stem is not None:
            files[name] = re.split(r"[_-]", stem)[-1].lower()
    for convention, naming in BRATS_NAMING.items():
        found = {naming[suffix]: os.path.join(folder, name) for name, suffix in files.items() if suffix in naming}
        if len(found) == len(naming):
            break
    else:
        raise DataError(f"{folder}: expected one NIfTI file per modality, <case>_{{flair,t1,t1ce,t2}}.nii.gz "
                        f"(2018-21) or <case>-{{t2f,t1n,t1c,t2w}}.nii.gz (2023+); found {sorted(files)}")
    seg = [name for name, suffix in files.items() if suffix == "seg"]
    # BraTS20_Training_355 names its seg file differently: take the one file left over.
    leftover = [name for name, suffix in files.items() if suffix not in naming and suffix != "seg"]
    if not seg and len(leftover) == 1:
        log.warning("%s: no *_seg file; using %s as the segmentation", folder, leftover[0])
        seg = leftover
    if len(seg) > 1 or (not seg and leftover):
        raise DataError(f"{folder}: cannot tell which file is the segmentation among {sorted(seg or leftover)}")
    found["seg"] = os.path.join(folder, seg[0]) if seg else None
    return found, convention


def load_nifti(path):
    """(array as stored on disk, affine, zooms) of one NIfTI file; a DataError when it cannot be read."""
    nib = require("nibabel", "reading NIfTI")
    try:
        img = nib.load(path)
        return np.asarray(img.dataobj), np.asarray(img.affine, np.float64), img.header.get_zooms()[:3]
    except Exception as err:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...) for bad files
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); is it truncated?") from None


def read_brats(folder, crop=True):
    """One BraTS case folder -> Case with channels (flair, t1, t1ce, t2), labels in 2018-21 values."""
    files, convention = brats_files(folder)
    channels, affine, zooms = [], None, None
    for modality in MODALITIES:
        data, file_affine, file_zooms = load_nifti(files[modality])
        if data.ndim != 3:
            raise DataError(f"{files[modality]}: NIfTI has shape {data.shape}; expected 3 dimensions")
        if channels and data.shape != channels[0].shape:
            raise DataError(f"{files[modality]}: shape {data.shape} differs from {files['flair']} "
                            f"{channels[0].shape}; modalities must be co-registered")
        affine, zooms = (file_affine, file_zooms) if affine is None else (affine, zooms)
        channels.append(data)
    image = np.stack(channels).astype(np.float32).transpose(0, 3, 2, 1)  # (C, X, Y, Z) -> (C, Z, Y, X)
    _check_image(image, files["flair"])
    mask = None if files["seg"] is None else _brats_mask(files["seg"], convention, channels[0].shape)
    attrs = {"modalities": list(MODALITIES), "affine": affine, "source_format": "brats-nifti",
             "label_convention": convention}
    case = Case(os.path.basename(os.path.normpath(folder)), image, mask,
                tuple(float(z) for z in reversed(zooms)), attrs)
    return crop_case(case, folder) if crop else case


def _brats_mask(path, convention, shape):
    seg, _, _ = load_nifti(path)
    if seg.shape != shape:
        raise DataError(f"{path}: mask has shape {seg.shape}, image has {shape}; they must match")
    if not np.all(seg == np.round(seg)):
        raise DataError(f"{path}: segmentation holds non-integer values; expected a label map")
    other = "2023" if convention == "2018" else "2018"
    _check_labels(seg, SEG_LABELS[convention], path,
                  f"; file names follow the BraTS {convention} naming, whose labels are {list(SEG_LABELS[convention])}"
                  f" (BraTS {other} uses {list(SEG_LABELS[other])})")
    mask = seg.astype(np.uint8)
    if convention == "2023":
        mask[mask == 3] = 4  # 2023+ enhancing tumour is 3; the project keeps the 2018-21 value 4
    return np.ascontiguousarray(mask.transpose(2, 1, 0))


# ----------------------------------------------------------------------------- Kaggle BraTS2020 slices

def find_kaggle_slices(src):
    """Group volume_<v>_slice_<s>.h5 files (anywhere under src) by volume, slices in numeric order."""
    volumes = defaultdict(list)
    for path in glob.glob(os.path.join(src, "**", "volume_*_slice_*.h5"), recursive=True):
        match = KAGGLE_SLICE.match(os.path.basename(path))
        if match:
            volumes[int(match.group(1))].append((int(match.group(2)), path))
    if not volumes:
        raise _nothing_found(src, "Kaggle BraTS2020 slice files (volume_<v>_slice_<s>.h5)")
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
        _check_image(image, path)
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


# ---------------------------------------------------------------------------------- Kaggle LGG TIFFs

def find_lgg(src):
    """Every folder under src holding <patient>_<n>_mask.tif files is one patient."""
    folders = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(src, "**", "*_mask.tif"), recursive=True)})
    if not folders:
        raise _nothing_found(src, "LGG patient folders (<patient>_<n>.tif with <patient>_<n>_mask.tif)")
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
        raise _nothing_found(folder, "LGG slice images (<patient>_<n>.tif)")
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
        _check_labels(mask, (0, 255), mask_path, "; LGG masks are 0 or 255")
        images.append(image)
        masks.append((mask == 255).astype(np.uint8))
        numbers.append(number)
    image = np.moveaxis(np.stack(images).astype(np.float32), -1, 0)
    # slice_numbers: each stored slice's <n> in its source file name, so predictions go back to <patient>_<n>
    attrs = {"modalities": list(LGG_MODALITIES), "source_format": "lgg-tiff", "slice_numbers": numbers}
    return Case(os.path.basename(os.path.normpath(folder)), image, np.stack(masks), (1.0, 1.0, 1.0), attrs)


# ------------------------------------------------------------------------------------ generic .h5

KEPT_ATTRS = ("affine", "original_shape", "crop_box", "label_convention")


def find_h5(src):
    paths = sorted(glob.glob(os.path.join(src, "*.h5")))
    if not paths:
        raise _nothing_found(src, ".h5 case files")
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

