"""Writing predictions for people and other tools: label maps, probabilities and overlay PNGs.

A case that came from NIfTI (attrs has an affine) gets `<case>.nii.gz`: uint8 BraTS labels
(1 necrosis, 2 edema, enhancing as `enhancing_label` says) un-cropped to the source grid, in
the source's axis order, with the source affine, so it lies exactly on the source `_seg.nii.gz`.
Any other case gets `<case>.h5` with a uint8 dataset 'mask' on the case's stored grid (un-cropped
when the case records a crop box). Probabilities go to `<case>_probabilities.npz` (float16
WT/TC/ET, same grid and axis order as the label map). Overlays are PNGs of the FLAIR slice with
the most tumour, ground truth and prediction contours per region. Every file is written atomically.
A binary task (one region, e.g. Kaggle LGG) writes label 1 where tumour is predicted; a case
converted from the Kaggle LGG TIFFs (attrs source_format "lgg-tiff") also gets the dataset's own
layout, `<patient>/<patient>_<n>_pred.tif` (uint8 0/255 per source slice, see save_lgg_tiffs).
The label map is postprocess.to_label_map of the scored regions (scoring.score_probabilities'
`pred`, already the regions of the postprocessed map), so the file is exactly what was scored.
Every writer of label maps (evaluate.py, predict.py) labels enhancing tumour with `enhancing_label`.
"""
import gzip
import io
import logging
import os

import h5py
import numpy as np

from cases.geometry import to_original_grid
from cases.patients import BRATS_2023_NAME
from evaluation.postprocess import ENHANCING, to_label_map
from runtime.atomic import atomic_path
from transforms.regions import REGIONS, labels_to_regions

log = logging.getLogger(__name__)
REGION_COLOURS = {"WT": "#2ca02c", "TC": "#ffbf00", "ET": "#d62728", "tumour": "#2ca02c"}
# Enhancing tumour's label in each BraTS label convention (conversion/nifti.py's SEG_LABELS). The
# 2024+ data keep the 2023 names and labels, and use 4 for the resection cavity, so 4 must not
# be written for ET there.
ENHANCING_LABEL = {"2018": 4, "2023": 3}


def label_convention(case):
    """'2018' or '2023': the BraTS label convention of a case as its conversion recorded it (attrs
    label_convention, from the source file names), else '2023' for a BraTS 2023+ case name
    (BraTS-GLI-00000-000); None when neither says."""
    recorded = case.attrs.get("label_convention")
    if recorded:
        return str(recorded)
    return "2023" if BRATS_2023_NAME.match(case.case_id) else None


def enhancing_label(case, default=ENHANCING):
    """The label a written map gives enhancing tumour: that of the case's own convention, or
    `default` (eval.enhancing_label) for a case whose convention is unknown."""
    return ENHANCING_LABEL.get(label_convention(case), default)


def write_nifti(path, data, affine):
    """A NIfTI file (.nii.gz) of `data` with `affine`; the header's dtype is the data's."""
    import nibabel as nib

    affine = np.asarray(affine, np.float64)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # scanner-anatomical, as the BraTS sources declare both
    image.set_sform(affine, code=1)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(gzip.compress(image.to_bytes(), compresslevel=6))
    return path


def save_label_map(out_dir, case_id, labels, attrs, spacing):
    """Write a stored-grid label map (D, H, W) as NIfTI (source affine) or .h5; returns the path."""
    data = np.ascontiguousarray(to_original_grid(labels.astype(np.uint8), attrs))
    if "affine" in attrs:
        return write_nifti(os.path.join(out_dir, f"{case_id}.nii.gz"), data, attrs["affine"])
    path = os.path.join(out_dir, f"{case_id}.h5")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("mask", data=data, compression="lzf")
        f.attrs["spacing"] = np.asarray(spacing, np.float64)
        f.attrs["case_id"] = case_id
    return path


def save_lgg_tiffs(out_dir, case_id, labels, attrs):
    """A binary prediction (D, H, W) of a case converted from Kaggle LGG TIFFs, written in the
    dataset's own layout: out_dir/<patient>/<patient>_<n>_pred.tif, one uint8 0/255 (H, W) image per
    slice, <n> the source slice numbers (attrs slice_numbers; 1..D for cases converted before the
    conversion recorded them, as Kaggle numbers a patient's slices). Returns the paths written."""
    import tifffile

    numbers = [int(n) for n in attrs.get("slice_numbers", range(1, len(labels) + 1))]
    if len(numbers) != len(labels):
        raise ValueError(f"{case_id}: {len(numbers)} slice_numbers for a prediction of {len(labels)} slices")
    written = []
    for number, labels_slice in zip(numbers, labels):
        path = os.path.join(out_dir, case_id, f"{case_id}_{number}_pred.tif")
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, np.where(labels_slice > 0, 255, 0).astype(np.uint8))
        written.append(path)
    return written


def save_probabilities(out_dir, case_id, probs, attrs, region_names=tuple(REGIONS)):
    """Region probabilities (R, D, H, W) as float16 .npz on the same grid as the label map."""
    path = os.path.join(out_dir, f"{case_id}_probabilities.npz")
    data = to_original_grid(np.asarray(probs, np.float16), attrs)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=data, regions=np.array(list(region_names)))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    return path


def flair_channel(attrs):
    modalities = [str(m).lower() for m in attrs.get("modalities", [])]
    return modalities.index("flair") if "flair" in modalities else 0


def largest_tumour_slice(regions):
    """Axial index (axis 0 of the stored grid) with the most whole-tumour voxels; middle if none."""
    area = np.asarray(regions[0], bool).sum(axis=(1, 2))
    return int(area.argmax()) if area.any() else regions.shape[1] // 2


def save_overlay(path, flair, pred_regions, truth_regions=None, title="", region_names=tuple(REGIONS)):
    """PNG of the FLAIR slice with the largest tumour, with region contours: one panel for the
    ground truth (when given) and one for the prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    z = largest_tumour_slice(truth_regions if truth_regions is not None and truth_regions[0].any() else pred_regions)
    panels = ([("ground truth", truth_regions)] if truth_regions is not None else []) + [("prediction", pred_regions)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.8), squeeze=False)
    for ax, (name, regions) in zip(axes[0], panels):
        ax.imshow(flair[z], cmap="gray", interpolation="nearest")
        for region, channel in zip(region_names, regions):
            if channel[z].any():
                ax.contour(channel[z].astype(float), levels=[0.5], colors=REGION_COLOURS[region], linewidths=1)
        ax.set_title(f"{name}, slice {z}")
        ax.axis("off")
    handles = [Line2D([], [], color=REGION_COLOURS[r], label=r) for r in region_names]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def export_case(out_dir, case, pred_regions, *, probs=None, default_enhancing=ENHANCING, predictions=True,
                overlay=True, regions=REGIONS):
    """Every requested output of one predicted case; returns the paths written.

    case: cases.Case (mask may be None); pred_regions: boolean (R, D, H, W) on the stored grid, one
    channel per entry of `regions` ({name: labels}, the task's regions): the scored regions
    (scoring.score_probabilities' `pred`), whose label map is the one written, enhancing tumour
    labelled as the case's convention says (`enhancing_label`; `default_enhancing` when unknown).
    """
    written = []
    if predictions:
        folder = os.path.join(out_dir, "predictions")
        task = "binary" if len(regions) == 1 else "brats"   # the two tasks of config.TASK_REGIONS
        labels = to_label_map(pred_regions, task, enhancing_label(case, default_enhancing))
        written.append(save_label_map(folder, case.case_id, labels, case.attrs, case.spacing))
        if case.attrs.get("source_format") == "lgg-tiff":
            written += save_lgg_tiffs(folder, case.case_id, labels, case.attrs)
        if probs is not None:
            written.append(save_probabilities(folder, case.case_id, probs, case.attrs, list(regions)))
    if overlay:
        truth = labels_to_regions(case.mask, regions).numpy() > 0.5 if case.mask is not None else None
        flair = case.image[flair_channel(case.attrs)]
        written.append(save_overlay(os.path.join(out_dir, "overlays", f"{case.case_id}.png"), flair,
                                    np.asarray(pred_regions, bool), truth, case.case_id, list(regions)))
    return written
