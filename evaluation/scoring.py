"""One case's region probabilities thresholded, postprocessed and scored at its native grid: the
path evaluation and validation share (ensemble.py predicts, then calls score_probabilities), so a
validation Dice and a test Dice mean the same thing (every eval.* key: threshold, gaussian,
mirror, overlap, postprocessing). What is scored is what export writes: the regions of the
postprocessed label map (postprocess.predicted_regions), nested ET in TC in WT.
"""
from dataclasses import dataclass

import numpy as np
import torch

from cases.geometry import uncrop
from evaluation.lesions import case_lesion_scores
from evaluation.metrics import score_case, slice_scores
from evaluation.postprocess import predicted_regions
from transforms.regions import labels_to_regions, task_regions


def scoring_grid(regions, attrs):
    """Regions on the case's original (uncropped) grid, as BraTS scores them: the cropped-away
    background counts as true negatives in the specificity. Axis order stays the stored one, so
    the spacing still applies."""
    if "crop_box" in attrs and "original_shape" in attrs:
        return uncrop(regions, attrs["crop_box"], attrs["original_shape"])
    return regions


@dataclass
class CaseResult:
    probs: torch.Tensor           # (R, *spatial) float region probabilities at the native grid
    pred: np.ndarray              # (R, *spatial) bool regions of the postprocessed label map (nested; exported)
    truth: np.ndarray | None      # (R, *spatial) bool regions of the mask; None for an unlabelled case
    scores: dict                  # {region: {metric: value}} ({} unlabelled); binary tasks add "slices"
    confidence: float | None = None  # confidence.case_confidence, when asked for (ensemble.evaluate_case)


def score_probabilities(probs, case, cfg, *, with_hd95=True, with_lesions=False):
    """Threshold and postprocess region probabilities (one model's or an ensemble's mean) into the
    exported label map's regions, and score them when the case has a mask: Dice, IoU, sensitivity,
    specificity from voxel counts on the original grid; HD95 too when `with_hd95`; the BraTS 2023
    lesion-wise figures of lesions.LESION_KEYS too when `with_lesions` (evaluation only: slow)."""
    task, regions = cfg.data.task, task_regions(cfg.data.task)
    pred = predicted_regions(probs, task, cfg.eval)
    if case.mask is None:
        return CaseResult(probs, pred, None, {})
    truth = labels_to_regions(case.mask, regions).numpy() > 0.5
    pred_grid, truth_grid = scoring_grid(pred, case.attrs), scoring_grid(truth, case.attrs)
    scores = score_case(pred_grid, truth_grid, list(regions), case.spacing, with_hd95=with_hd95)
    if with_lesions:
        for name, figures in case_lesion_scores(pred_grid, truth_grid, list(regions), case.spacing).items():
            scores[name].update(figures)
    if task == "binary":
        scores["slices"] = slice_scores(pred[0], truth[0])
    return CaseResult(probs, pred, truth, scores)
