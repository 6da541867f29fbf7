"""One case predicted, postprocessed and scored at its native grid: the path evaluation and
validation share, so a validation Dice and a test Dice mean the same thing (every eval.* key:
threshold, gaussian, mirror, overlap, postprocessing).
"""
from dataclasses import dataclass

import numpy as np
import torch

from cases import read_case, uncrop
from inference import predict_case
from postprocess import keep_largest_component, remove_small_enhancing
from metrics import score_case, slice_scores
from transforms import labels_to_regions, task_regions


def scoring_grid(regions, attrs):
    """Regions on the case's original (uncropped) grid, as BraTS scores them: the cropped-away
    background counts as true negatives in the specificity. Axis order stays the stored one, so
    the spacing still applies."""
    if "crop_box" in attrs and "original_shape" in attrs:
        return uncrop(regions, attrs["crop_box"], attrs["original_shape"])
    return regions


def postprocess(pred, eval_cfg, task):
    """The configured postprocessing of a boolean (R, *spatial) prediction."""
    if task == "brats":
        pred = remove_small_enhancing(pred, eval_cfg.postprocess_et_min)
    if eval_cfg.largest_component:
        pred = keep_largest_component(pred)
    return pred


@dataclass
class CaseResult:
    probs: torch.Tensor           # (R, *spatial) float region probabilities at the native grid
    pred: np.ndarray              # (R, *spatial) bool: thresholded at eval.threshold, postprocessed
    truth: np.ndarray | None      # (R, *spatial) bool regions of the mask; None for an unlabelled case
    scores: dict                  # {region: {metric: value}} ({} unlabelled); binary tasks add "slices"


def evaluate_case(model, case, cfg, device, amp_dtype=None, with_hd95=True):
    """Predict a cases.Case, postprocess, and score it when it has a mask (Dice, IoU, sensitivity,
    specificity from voxel counts on the original grid; HD95 too when `with_hd95`)."""
    task, regions = cfg.data.task, task_regions(cfg.data.task)
    probs = predict_case(model, case.image, cfg, device, amp_dtype, case.spacing)
    pred = postprocess((probs > cfg.eval.threshold).numpy(), cfg.eval, task)
    if case.mask is None:
        return CaseResult(probs, pred, None, {})
    truth = labels_to_regions(case.mask, regions).numpy() > 0.5
    scores = score_case(scoring_grid(pred, case.attrs), scoring_grid(truth, case.attrs), list(regions),
                        case.spacing, with_hd95=with_hd95)
    if task == "binary":
        scores["slices"] = slice_scores(pred[0], truth[0])
    return CaseResult(probs, pred, truth, scores)


class CaseCache:
    """Cases read from disk once and kept in memory up to `budget_bytes`, for a pass that reads
    the same cases every epoch (validation); cases beyond the budget are re-read each time."""

    def __init__(self, fmt, budget_bytes):
        self.fmt, self.budget, self.cases, self.nbytes = fmt, budget_bytes, {}, 0

    def read(self, path):
        if path in self.cases:
            return self.cases[path]
        case = read_case(path, self.fmt)
        size = case.image.nbytes + case.mask.nbytes
        if self.nbytes + size <= self.budget:
            self.cases[path], self.nbytes = case, self.nbytes + size
        return case
