"""Test fixture: a tiny local converter of the shared real BraTS NIfTI cases to the project layout.

It stands in for `prepare_data.py brats` (another branch) until that lands: nibabel load of the
four modalities and the seg, transpose (X, Y, Z) -> (Z, Y, X), crop to the brain's bounding box,
write_case with affine, original_shape, crop_box and spacing attributes.
"""
import os

import numpy as np

from cases import MODALITIES, write_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "brats18-sample")
SKIP_REASON = f"real BraTS sample not found at {BRATS_SAMPLE} (see shared/data/README.md)"


def sample_cases():
    if not os.path.isdir(BRATS_SAMPLE):
        return []
    return sorted(d for d in os.listdir(BRATS_SAMPLE) if os.path.isdir(os.path.join(BRATS_SAMPLE, d)))


def source_seg_path(case_id):
    return os.path.join(BRATS_SAMPLE, case_id, f"{case_id}_seg.nii.gz")


def brain_box(image, mask):
    """3 x [start, stop] of the non-zero voxels of any channel or the mask."""
    inside = (image != 0).any(0) | (mask > 0)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def convert_case(case_id, out_dir):
    """Convert one shared BraTS case; returns the .h5 path."""
    import nibabel as nib

    folder = os.path.join(BRATS_SAMPLE, case_id)
    image = np.stack([np.asarray(nib.load(os.path.join(folder, f"{case_id}_{m}.nii.gz")).dataobj, np.float32)
                      .transpose(2, 1, 0) for m in MODALITIES])
    seg = nib.load(source_seg_path(case_id))
    mask = np.asarray(seg.dataobj).astype(np.uint8).transpose(2, 1, 0)
    box = brain_box(image, mask)
    crop = tuple(slice(a, b) for a, b in box)
    spacing = tuple(float(z) for z in seg.header.get_zooms()[:3])[::-1]
    return write_case(os.path.join(out_dir, f"{case_id}.h5"), image[(slice(None), *crop)], mask[crop], spacing,
                      affine=seg.affine, original_shape=mask.shape, crop_box=box)
