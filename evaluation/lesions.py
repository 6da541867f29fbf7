"""BraTS 2023 lesion-wise Dice and HD95 of one region of one case.

Follows the official scorer (rachitsaluja/BraTS-2023-Metrics, `get_lesion_wise_score` and
`get_lesion_wise_results`), with the BraTS-GLI parameters:
- components of truth and prediction are 26-connected (faces, edges and corners touch);
- ground-truth components whose dilations touch are one lesion (the official "combined by
  dilation" step), so satellites next to a tumour are not separate lesions;
- the dilation is 3 iterations of a binary dilation with the 18-neighbourhood element
  (`generate_binary_structure(3, 2)`: faces and edges, not corners), in voxels whatever the spacing;
- a predicted component matches a truth lesion when it touches the lesion's dilation; the lesion's
  Dice and HD95 are taken against the union of every component it matches (whole components, also
  their parts outside the dilation);
- truth lesions of at most 50 mm^3 (voxel count x voxel volume) are left out of the averages, the
  same limit for WT, TC and ET; a predicted component matched to one of them is no false positive;
- predicted components that match no truth lesion are false positives whatever their size, each
  adding Dice 0 and HD95 374 mm; a missed truth lesion gets Dice 0 and HD95 374 mm;
- a lesion's HD95 is the official one (surface-distance's `compute_robust_hausdorff(..., 95)`):
  the larger of the two one-way 95th percentiles, truth to prediction and prediction to truth,
  not the 95th percentile of both directions pooled that `metrics.hd95` (medpy, panoptica) takes;
- lesion-wise Dice = sum of lesion Dice / (kept truth lesions + false positives), HD95 likewise;
  nothing to average (both empty, or only ignored lesions and no false positive) -> Dice 1, HD95 0.
Other BraTS 2023 challenges differ only in the parameters (MEN: 1 dilation; MET: 1 dilation and
2 mm^3). The one-way distances are the project's (`metrics.surface_distances`: face-connected
surface voxels, percentiles interpolated linearly), not the surface-distance package's, which
weighs each surface element by its area: on a lesion's HD95 that can differ by a fraction of a voxel.
"""
import numpy as np
from scipy import ndimage

from evaluation.metrics import surface_distances

CONNECTIVITY = 26           # neighbours that join voxels into one component (truth and prediction)
DILATION_CONNECTIVITY = 2   # dilation element: generate_binary_structure(3, 2), the 18-neighbourhood
DILATION_ITERATIONS = 3     # dilations of each truth lesion to find the predicted components it matches
MIN_LESION_MM3 = 50.0       # truth lesions of at most this volume are ignored
MAX_HD95 = 374.0            # HD95 of a missed lesion or a false positive, mm

_COMPONENTS = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[CONNECTIVITY])
_DILATION = ndimage.generate_binary_structure(3, DILATION_CONNECTIVITY)
LESION_KEYS = ("lesion_dice", "lesion_hd95", "gt_lesions", "matched_lesions", "fp_lesions")
LESION_COUNTS = LESION_KEYS[2:]   # counts: summed over cases in reports, the others averaged


def scoring_parameters():
    """The rules behind these figures as reports state them (summary.json's lesion_scoring)."""
    return {"reference": "BraTS 2023 lesion-wise metrics (rachitsaluja/BraTS-2023-Metrics), BraTS-GLI parameters",
            "connectivity": CONNECTIVITY,
            "dilation": {"iterations": DILATION_ITERATIONS,
                         "neighbourhood": {1: 6, 2: 18, 3: 26}[DILATION_CONNECTIVITY]},
            "min_lesion_mm3": MIN_LESION_MM3, "max_hd95_mm": MAX_HD95,
            "hd95": "per lesion, the larger of the two one-way 95th percentiles of the surface distances "
                    "(surface-distance's compute_robust_hausdorff, as the BraTS 2023 code)",
            "averages": "lesion_dice, lesion_hd95: mean over cases of each case's lesion-wise figure; "
                        "gt_lesions, matched_lesions, fp_lesions: summed over cases"}


def truth_lesions(truth, iterations=DILATION_ITERATIONS):
    """Label map of the truth lesions (0 background) and their count: 26-connected components,
    merged where their dilations touch."""
    dilated = ndimage.binary_dilation(truth, _DILATION, iterations=iterations)
    merged, count = ndimage.label(dilated, _COMPONENTS)
    return np.where(truth, merged, 0), count


def _grown(box, shape, margin):
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def matched_components(lesion, pred_components, box, iterations=DILATION_ITERATIONS):
    """Labels of the predicted components touching the dilated `lesion` (boolean, whole volume);
    the dilation runs in the lesion's bounding `box` grown by `iterations`, where it lies whole."""
    box = _grown(box, lesion.shape, iterations)
    zone = ndimage.binary_dilation(lesion[box], _DILATION, iterations=iterations)
    hits = np.unique(pred_components[box][zone])
    return hits[hits > 0]


def robust_hd95(pred, truth, spacing):
    """The BraTS 2023 per-lesion HD95 of two non-empty masks, in mm: the larger of the two one-way
    95th percentiles of the surface distances."""
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def lesion_dice_hd95(found, lesion, spacing):
    """Dice and HD95 of one truth lesion against the predicted components it matched (`found`)."""
    if not found.any():
        return 0.0, MAX_HD95
    dice = 2 * np.count_nonzero(found & lesion) / (np.count_nonzero(found) + np.count_nonzero(lesion))
    return dice, robust_hd95(found, lesion, spacing)


def _check(pred, truth, region):
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    name = f"region {region}" if region else "lesion scores"
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"{name}: prediction {pred.shape} and truth {truth.shape} must be one 3D shape")
    return pred, truth


def lesion_scores(pred, truth, spacing=None, region=None, min_volume=MIN_LESION_MM3,
                  iterations=DILATION_ITERATIONS):
    """Lesion-wise figures of one region: boolean 3D `pred` and `truth`, `spacing` in mm per axis
    (volumes for the size limit and HD95; 1 mm when None); `region` only names it in errors.
    Returns {lesion_dice, lesion_hd95, gt_lesions (kept truth lesions), matched_lesions (kept ones
    with a predicted match), fp_lesions (unmatched predicted components)}."""
    pred, truth = _check(pred, truth, region)
    if iterations < 1:  # scipy reads 0 iterations as "dilate until nothing changes"
        raise ValueError(f"lesion scores: {iterations} dilation iterations; use 1 or more")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * 3
    voxel_mm3 = float(np.prod(spacing))
    lesions, _ = truth_lesions(truth, iterations)
    pred_components, n_pred = ndimage.label(pred, _COMPONENTS)
    matched_any, dice, dist, matched = set(), [], [], 0
    for label, box in enumerate(ndimage.find_objects(lesions), start=1):
        lesion = lesions == label
        hits = matched_components(lesion, pred_components, box, iterations)
        matched_any.update(int(h) for h in hits)
        if lesion.sum() * voxel_mm3 <= min_volume:
            continue
        lesion_dice, lesion_hd95 = lesion_dice_hd95(np.isin(pred_components, hits), lesion, spacing)
        dice.append(lesion_dice)
        dist.append(lesion_hd95)
        matched += int(hits.size > 0)
    false_positives = n_pred - len(matched_any)
    count = len(dice) + false_positives
    return {"lesion_dice": float(sum(dice) / count) if count else 1.0,
            "lesion_hd95": float((sum(dist) + false_positives * MAX_HD95) / count) if count else 0.0,
            "gt_lesions": len(dice), "matched_lesions": matched, "fp_lesions": false_positives}


def case_lesion_scores(pred_regions, truth_regions, region_names, spacing=None):
    """{region: lesion_scores(...)} of one case; inputs are boolean (R, D, H, W) arrays."""
    return {name: lesion_scores(pred, truth, spacing, name)
            for name, pred, truth in zip(region_names, pred_regions, truth_regions)}
