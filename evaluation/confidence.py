"""How sure the network is of a case, from its probabilities alone, so a failed case can be found
without ground truth.

A case's confidence is the soft Dice between each region's probability map and its own thresholded
mask, averaged over regions: 1 when every voxel's probability sits at 0 or 1, lower when the
predicted tumour is a haze of middling probabilities or when much probability lies below the
threshold (tumour the network half-saw and dropped). Where several predictions of the case exist
(an ensemble's members) their agreement counts too: the mean pairwise Dice of their thresholded
masks. (Mirrored passes are averaged window by window inside inference.py, so their separate maps
never exist; keeping them would cost a map per flip.) On labelled data `rank_correlation` says how well the confidence orders the
cases by their true Dice.
"""
import itertools

import numpy as np
from scipy import stats

EMPTY = 1e-6   # probability mass below which a region counts as confidently empty


def self_consistency(probs, threshold=0.5):
    """Soft Dice between a probability map and its thresholded mask: 2 * sum(p * m) / (sum(p) + sum(m))."""
    probs = np.asarray(probs, np.float64)
    mask = probs > threshold
    total = probs.sum() + mask.sum()
    if total < EMPTY:
        return 1.0
    return float(2.0 * probs[mask].sum() / total)


def mask_agreement(masks):
    """Mean pairwise Dice of boolean masks (1 for a single mask; two empty masks agree fully)."""
    if len(masks) < 2:
        return 1.0
    dices = []
    for a, b in itertools.combinations(masks, 2):
        total = np.count_nonzero(a) + np.count_nonzero(b)
        dices.append(1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total)
    return float(np.mean(dices))


def members_agreement(members, threshold=0.5):
    """Mean over regions of the pairwise Dice (mask_agreement) of several predictions of one case,
    each (R, *spatial) probabilities or boolean masks (taken as they are)."""
    regions = len(members[0])
    return float(np.mean([mask_agreement([np.asarray(m[r]) > threshold for m in members]) for r in range(regions)]))


def case_confidence(probs, threshold=0.5, members=()):
    """Confidence of one case in [0, 1]: the mean over regions of the self-consistency of the
    region probabilities `probs` (R, *spatial); where two or more `members` are given (the
    predictions `probs` is the mean of, such as an ensemble's members: each (R, *spatial)
    probabilities or boolean masks), times their agreement (members_agreement)."""
    probs = np.asarray(probs)
    confidence = float(np.mean([self_consistency(channel, threshold) for channel in probs]))
    if len(members) > 1:
        confidence *= members_agreement(members, threshold)
    return confidence


def least_confident(per_case, n=5):
    """The `n` case ids with the lowest confidence, lowest first; per_case: {case_id: confidence}."""
    return [case for case, _ in sorted(per_case.items(), key=lambda item: (item[1], item[0]))[:n]]


def rank_correlation(confidence, dice):
    """Spearman's rank correlation between per-case confidence and true Dice (two equal-length
    sequences); None with fewer than 3 cases or when either is constant (no order to compare)."""
    confidence, dice = np.asarray(confidence, np.float64), np.asarray(dice, np.float64)
    if len(confidence) < 3 or np.ptp(confidence) == 0 or np.ptp(dice) == 0:
        return None
    return float(stats.spearmanr(confidence, dice).statistic)
