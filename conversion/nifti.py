"""BraTS NIfTI case folders -> `Case`: the reader `prepare_data.py brats` converts with and
`predict.py` predicts from (in memory, nothing written).

  <case>/<case>_{flair,t1,t1ce,t2,seg}.nii(.gz) (2018-21, labels 0/1/2/4) or
  <case>/<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz (2023+, labels 0/1/2/3, 3 = enhancing)

Case folders may sit directly in the source folder (BraTS 2021/2023) or deeper (2018's HGG/ and
LGG/). The modalities of a case must be co-registered: the same shape and the same affine (a T1
shifted by 50 mm would otherwise be stacked silently onto the FLAIR). NIfTI arrays (X, Y, Z) are
transposed to (Z, Y, X), as cases/h5.py documents; `cases.geometry.to_original_grid` undoes the crop
and the transpose so a prediction can be written back with the source affine.
"""
import glob
import logging
import os
import re

import numpy as np

from cases.h5 import MODALITIES, Case, DataError
from conversion.layouts import check_image, check_labels, crop_case, nothing_found, require

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# File-name suffix -> project channel, per BraTS naming convention. Channels are always stored in
# the project order (flair, t1, t1ce, t2), so a model trained on one convention reads the other.
BRATS_NAMING = {
    "2018": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
    "2023": {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"},
}
SEG_LABELS = {"2018": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}
AFFINE_TOLERANCE = 1e-3  # mm (and direction cosines): rounding in headers, far below a voxel


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
        raise nothing_found(src, "BraTS case folders (*.nii.gz / *.nii files)")
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


def check_registered(path, affine, reference_path, reference_affine):
    """A modality (or seg) must lie on the first modality's grid: the same affine within
    AFFINE_TOLERANCE, else one line naming the file and how far off it is."""
    if np.allclose(affine, reference_affine, rtol=0, atol=AFFINE_TOLERANCE):
        return
    shift = float(np.linalg.norm(affine[:3, 3] - reference_affine[:3, 3]))
    turned = float(np.abs(affine[:3, :3] - reference_affine[:3, :3]).max())
    raise DataError(f"{path}: affine differs from {reference_path} (origin {shift:.1f} mm apart, axes differ by "
                    f"up to {turned:.3g}); modalities must be co-registered on one grid")


def read_brats(folder, crop=True, with_mask=True):
    """One BraTS case folder -> Case with channels (flair, t1, t1ce, t2), labels in 2018-21 values
    (no mask when the folder has no seg file, or when `with_mask` is False)."""
    files, convention = brats_files(folder)
    channels, affine, zooms = [], None, None
    for modality in MODALITIES:
        data, file_affine, file_zooms = load_nifti(files[modality])
        if data.ndim != 3:
            raise DataError(f"{files[modality]}: NIfTI has shape {data.shape}; expected 3 dimensions")
        if channels and data.shape != channels[0].shape:
            raise DataError(f"{files[modality]}: shape {data.shape} differs from {files['flair']} "
                            f"{channels[0].shape}; modalities must be co-registered")
        if affine is None:
            affine, zooms = file_affine, file_zooms
        check_registered(files[modality], file_affine, files["flair"], affine)
        channels.append(data)
    image = np.stack(channels).astype(np.float32).transpose(0, 3, 2, 1)  # (C, X, Y, Z) -> (C, Z, Y, X)
    check_image(image, files["flair"])
    mask = None
    if with_mask and files["seg"] is not None:
        mask = _brats_mask(files["seg"], convention, channels[0].shape, (files["flair"], affine))
    attrs = {"modalities": list(MODALITIES), "affine": affine, "source_format": "brats-nifti",
             "label_convention": convention}
    case = Case(os.path.basename(os.path.normpath(folder)), image, mask,
                tuple(float(z) for z in reversed(zooms)), attrs)
    return crop_case(case, folder) if crop else case


def _brats_mask(path, convention, shape, reference):
    """The seg file as a (Z, Y, X) mask in 2018-21 labels; `reference` (path, affine) is the FLAIR it must lie on."""
    seg, seg_affine, _ = load_nifti(path)
    if seg.shape != shape:
        raise DataError(f"{path}: mask has shape {seg.shape}, image has {shape}; they must match")
    check_registered(path, seg_affine, *reference)
    if not np.all(seg == np.round(seg)):
        raise DataError(f"{path}: segmentation holds non-integer values; expected a label map")
    other = "2023" if convention == "2018" else "2018"
    check_labels(seg, SEG_LABELS[convention], path,
                 f"; file names follow the BraTS {convention} naming, whose labels are {list(SEG_LABELS[convention])}"
                 f" (BraTS {other} uses {list(SEG_LABELS[other])})")
    mask = seg.astype(np.uint8)
    if convention == "2023":
        mask[mask == 3] = 4  # 2023+ enhancing tumour is 3; the project keeps the 2018-21 value 4
    return np.ascontiguousarray(mask.transpose(2, 1, 0))
