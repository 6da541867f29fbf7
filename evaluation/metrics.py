"""BraTS scores for one case, computed from voxel counts at the case's native resolution,
and the per-slice figures of binary (2D) tasks.

Per region: Dice, IoU, sensitivity, specificity and HD95 (mm). The BraTS rules for empty
regions: truth and prediction both empty -> Dice 1, IoU 1, HD95 0, sensitivity 1; exactly one
empty -> Dice 0, IoU 0, HD95 373.13 (the diagonal of the BraTS volume), sensitivity 0 when the
truth is empty. Summaries are means over cases, never pooled over voxels or batches.
"""
import numpy as np
from scipy import ndimage

EMPTY_HD95 = 373.13
METRICS = ("dice", "iou", "sensitivity", "specificity", "hd95")


def confusion(pred, truth):
    """Voxel counts (tp, fp, fn, tn) of two boolean arrays."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return tp, fp, fn, int(pred.size - tp - fp - fn)


def scores_from_counts(tp, fp, fn, tn):
    """Dice, IoU, sensitivity, specificity with the BraTS empty rules."""
    if tp + fn == 0:  # empty truth: a perfect answer is an empty prediction
        hit = 1.0 if fp == 0 else 0.0
        return {"dice": hit, "iou": hit, "sensitivity": hit, "specificity": tn / max(tn + fp, 1)}
    return {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
            "sensitivity": tp / (tp + fn), "specificity": tn / max(tn + fp, 1)}


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def _union_box(a, b, margin=1):
    """Bounding box of a | b grown by `margin` voxels (clipped at the array): distances between the
    surfaces are the same inside it, the distance transforms run on far fewer voxels, and the
    margin keeps the erosion seeing the same neighbourhood as on the whole array."""
    union, box = a | b, []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return tuple(box)


def surface_distances(pred, truth, spacing=None):
    """(distances from each surface voxel of `pred` to the surface of `truth`, and from each of
    `truth`'s to `pred`'s), in mm (spacing per axis); both masks must hold a voxel."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    spacing = spacing or (1.0,) * pred.ndim
    box = _union_box(pred, truth)
    pred, truth = pred[box], truth[box]
    pred_surface, truth_surface = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    return to_truth, to_pred


def hd95(pred, truth, spacing=None):
    """95th percentile of the symmetric surface distances, both directions pooled (as medpy and
    panoptica, the current official BraTS scorer, compute it), in mm (spacing per axis)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return EMPTY_HD95
    return float(np.percentile(np.concatenate(surface_distances(pred, truth, spacing)), 95))


def score_case(pred_regions, truth_regions, region_names, spacing=None, with_hd95=True):
    """{region: {metric: value}} for one case; inputs are (R, *spatial) boolean arrays."""
    scores = {}
    for name, pred, truth in zip(region_names, pred_regions, truth_regions):
        scores[name] = scores_from_counts(*confusion(pred, truth))
        if with_hd95:
            scores[name]["hd95"] = hd95(pred, truth, spacing)
    return scores


def summarise(per_case, region_names, summed=()):
    """Mean, std and median over cases of every metric, except the counts named in `summed`, which
    are totalled; `per_case` is a list of score_case outputs."""
    summary = {}
    for name in region_names:
        summary[name] = {}
        for metric in per_case[0][name] if per_case else ():
            if metric in summed:
                summary[name][metric] = int(sum(case[name][metric] for case in per_case))
                continue
            values = np.array([case[name][metric] for case in per_case], dtype=float)
            summary[name][metric] = float(values.mean())
            summary[name][f"{metric}_std"] = float(values.std())
            summary[name][f"{metric}_median"] = float(np.median(values))
    return summary


def slice_scores(pred, truth):
    """Per-slice figures of one binary (D, H, W) case, slices along axis 0 (the 2D view of the LGG
    reference): Dice and IoU averaged over the slices whose truth holds tumour, and how many of the
    tumour-free slices got any predicted tumour (false-positive slices). Empty slices are counted,
    never scored as Dice 1: that would reward the easy slices and hide the hard ones.
    Returns {tumour_slices, dice, iou (None without tumour slices), empty_slices, false_positive_slices}."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    has_tumour = truth.reshape(len(truth), -1).any(1)
    predicted = pred.reshape(len(pred), -1).any(1)
    scores = [scores_from_counts(*confusion(p, t)) for p, t in zip(pred[has_tumour], truth[has_tumour])]
    return {"tumour_slices": int(has_tumour.sum()),
            "dice": float(np.mean([s["dice"] for s in scores])) if scores else None,
            "iou": float(np.mean([s["iou"] for s in scores])) if scores else None,
            "empty_slices": int((~has_tumour).sum()),
            "false_positive_slices": int((predicted & ~has_tumour).sum())}


def pool_slice_scores(per_case):
    """Per-slice Dice and IoU as means over every tumour slice of every case (each case's mean
    weighted by its tumour-slice count), and the false-positive slices summed over cases."""
    n = sum(c["tumour_slices"] for c in per_case)

    def pooled(metric):
        total = sum(c[metric] * c["tumour_slices"] for c in per_case if c["tumour_slices"])
        return float(total / n) if n else None

    return {"tumour_slices": n, "dice_over_tumour_slices": pooled("dice"), "iou_over_tumour_slices": pooled("iou"),
            "empty_slices": int(sum(c["empty_slices"] for c in per_case)),
            "false_positive_slices": int(sum(c["false_positive_slices"] for c in per_case))}
