"""Several checkpoints predicting one case together: the mean of their region probabilities.

Each member keeps its own config (data.mode, image_size, patch_size, the eval.* prediction keys)
and predicts at the case's native grid through inference.predict_case, so members trained with
different plans average voxel for voxel. The first member's eval.* keys (threshold,
postprocessing) turn the mean into a prediction. A run folder stands for its best.pt or, for a
cross-validation run (data.fold all), for the best.pt of every fold_<i> in it.
"""
import logging

import torch

from evaluation.inference import predict_case
from evaluation.scoring import score_probabilities

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probabilities(members, case, device):
    """Mean region probabilities (R, *spatial) of the members, each predicting the case's raw image
    (C, *spatial) at its native grid with its own config (and its own data.spacing)."""
    total = None
    for member in members:
        probs = predict_case(member.model, case.image, member.cfg, device, member.amp_dtype,
                             case.spacing).float().cpu()
        total = probs if total is None else total + probs
    return total / len(members)


def evaluate_ensemble_case(members, case, device, with_hd95=True, with_lesions=False):
    """scoring.evaluate_case for an ensemble: the members' mean probabilities, thresholded and
    postprocessed with the first member's eval.* keys, scored as one model's would be."""
    probs = predict_probabilities(members, case, device)
    return score_probabilities(probs, case, members[0].cfg, with_hd95, with_lesions)


def evaluate_case(model, case, cfg, device, amp_dtype=None, with_hd95=True, with_lesions=False):
    """Predict a cases.Case with one model and score it (score_probabilities)."""
    probs = predict_case(model, case.image, cfg, device, amp_dtype, case.spacing)
    return score_probabilities(probs, case, cfg, with_hd95, with_lesions)
