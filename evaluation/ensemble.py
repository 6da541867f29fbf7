"""Averaging members and scoring one case: the mean of several models' region probabilities, and
a case thresholded, postprocessed and scored from that mean or from one model's probabilities
(scoring.score_probabilities). Loading the checkpoints, single models included, is checkpoints.py's.

Each member keeps its own config (data.mode, image_size, patch_size, the eval.* prediction keys)
and predicts at the case's native grid through inference.predict_case, so members trained with
different plans average voxel for voxel; the first member's eval.* keys (threshold,
postprocessing) turn the mean into a prediction. Evaluation also gives each case a confidence
(confidence.py, no labels needed): an ensemble's counts how well its members agree.
"""
import logging

import torch

from evaluation.confidence import case_confidence
from evaluation.inference import predict_case
from evaluation.postprocess import threshold_regions
from evaluation.scoring import score_probabilities

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(members, case, device, *, with_masks=False):
    """Mean region probabilities (R, *spatial) of the members, each predicting the case's raw image
    (C, *spatial) at its native grid with its own config (and its own data.spacing). With
    `with_masks`, also each member's own thresholded regions (boolean numpy, at its eval.threshold;
    [] for one member), for the members' agreement: returns (mean, masks)."""
    total, masks = None, []
    for member in members:
        probs = predict_case(member.model, case.image, member.cfg, device, member.amp_dtype,
                             case.spacing).float().cpu()
        if with_masks and len(members) > 1:
            masks.append(threshold_regions(probs, member.cfg.eval))
        total = probs if total is None else total + probs
    mean = total / len(members)
    return (mean, masks) if with_masks else mean


def confidence_of(probs, threshold, member_masks=()):
    """confidence.case_confidence of region probabilities (a tensor on any device) and, for an
    ensemble, its members' thresholded regions."""
    return case_confidence(probs.float().cpu().numpy(), threshold, members=member_masks)


def evaluate_ensemble_case(members, case, device, *, with_hd95=True, with_lesions=False):
    """evaluate_case for an ensemble: the members' mean probabilities, thresholded and postprocessed
    with the first member's eval.* keys, scored as one model's would be; its confidence counts the
    members' agreement."""
    probs, masks = predict_probabilities(members, case, device, with_masks=True)
    cfg = members[0].cfg
    result = score_probabilities(probs, case, cfg, with_hd95=with_hd95, with_lesions=with_lesions)
    result.confidence = confidence_of(probs, cfg.eval.threshold, masks)
    return result


def evaluate_case(model, case, cfg, device, amp_dtype=None, *, with_hd95=True, with_lesions=False,
                  with_confidence=False):
    """Predict a cases.Case with one model and score it (score_probabilities); with
    `with_confidence`, also the case's confidence (no labels needed; validation skips it)."""
    probs = predict_case(model, case.image, cfg, device, amp_dtype, case.spacing)
    result = score_probabilities(probs, case, cfg, with_hd95=with_hd95, with_lesions=with_lesions)
    if with_confidence:
        result.confidence = confidence_of(probs, cfg.eval.threshold)
    return result
