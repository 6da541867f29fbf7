"""Per-case confidence without labels: hand-worked values, ordering of sure and unsure cases,
agreement between predictions, and the rank correlation with true Dice."""
import numpy as np
import pytest

from evaluation.confidence import (
    case_confidence,
    least_confident,
    mask_agreement,
    members_agreement,
    rank_correlation,
    self_consistency,
)


def test_self_consistency_is_hand_worked_soft_dice():
    probs = np.array([0.9, 0.9, 0.2, 0.0])  # mask [1, 1, 0, 0]: 2 * 1.8 / (2.0 + 2) = 0.9
    assert self_consistency(probs) == pytest.approx(0.9)
    assert self_consistency(np.array([1.0, 1.0, 0.0])) == pytest.approx(1.0)
    assert self_consistency(np.zeros(5)) == 1.0  # confidently empty


def test_probability_left_below_the_threshold_lowers_confidence():
    probs = np.array([0.45, 0.45, 0.45, 0.45])  # tumour half-seen and dropped: mask empty, mass 1.8
    assert self_consistency(probs) == 0.0


def test_a_crisp_case_is_more_confident_than_a_hazy_one():
    crisp = np.zeros((3, 8, 8, 8))
    crisp[:, 2:6, 2:6, 2:6] = 0.98
    hazy = np.zeros((3, 8, 8, 8))
    hazy[:, 1:7, 1:7, 1:7] = 0.55
    assert case_confidence(crisp) > 0.95 > case_confidence(hazy)


def test_mask_agreement_is_pairwise_dice():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 0, 0], bool)
    assert mask_agreement([a]) == 1.0
    assert mask_agreement([a, b]) == pytest.approx(2 / 3)
    assert mask_agreement([np.zeros(3, bool), np.zeros(3, bool)]) == 1.0


def test_members_that_disagree_lower_the_confidence():
    probs = np.zeros((1, 10))
    probs[0, :4] = 1.0
    same, other = probs.copy(), np.zeros((1, 10))
    other[0, 6:] = 1.0
    assert case_confidence(probs, members=[probs, same]) == pytest.approx(1.0)
    assert case_confidence(probs, members=[probs, other]) == pytest.approx(0.0)
    assert case_confidence(probs, members=[other]) == pytest.approx(1.0)   # one member: nothing to compare


def test_members_agreement_takes_masks_and_averages_regions():
    a = np.zeros((2, 6), bool)
    a[:, :2] = True                                # both regions: voxels 0-1
    b = a.copy()
    b[1, 2:4] = True                               # region 1: voxels 0-3, Dice 2*2/(2+4) = 2/3
    assert members_agreement([a, b]) == pytest.approx((1 + 2 / 3) / 2)
    assert members_agreement([a, b.astype(np.float32) * 0.9]) == pytest.approx((1 + 2 / 3) / 2)


def test_least_confident_lists_the_lowest_first():
    assert least_confident({"a": 0.9, "b": 0.2, "c": 0.5, "d": 0.95}, n=2) == ["b", "c"]


def test_rank_correlation_orders_cases():
    assert rank_correlation([0.1, 0.5, 0.9, 0.7], [0.2, 0.6, 0.95, 0.8]) == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.5, 0.9], [0.9, 0.5, 0.1]) == pytest.approx(-1.0)
    assert rank_correlation([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) is None
    assert rank_correlation([0.1, 0.2], [0.1, 0.2]) is None
