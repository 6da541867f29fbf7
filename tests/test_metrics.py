import numpy as np
import pytest

from evaluation.metrics import EMPTY_HD95, confusion, hd95, score_case, scores_from_counts, summarise


def cube(shape, lo, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo[i], lo[i] + size) for i in range(len(shape)))] = True
    return mask


def test_hand_made_overlap():
    truth = cube((10, 10, 10), (0, 0, 0), 4)          # 64 voxels
    pred = cube((10, 10, 10), (0, 0, 2), 4)           # overlaps in 4*4*2 = 32
    tp, fp, fn, tn = confusion(pred, truth)
    assert (tp, fp, fn, tn) == (32, 32, 32, 1000 - 96)
    s = scores_from_counts(tp, fp, fn, tn)
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["sensitivity"] == pytest.approx(0.5)
    assert s["specificity"] == pytest.approx((1000 - 96) / (1000 - 64))
    assert s["dice"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]))


@pytest.mark.parametrize("pred_empty, truth_empty, dice, hd", [
    (True, True, 1.0, 0.0), (True, False, 0.0, EMPTY_HD95), (False, True, 0.0, EMPTY_HD95)])
def test_brats_empty_rules(pred_empty, truth_empty, dice, hd):
    some = cube((8, 8, 8), (2, 2, 2), 3)
    none = np.zeros((8, 8, 8), bool)
    pred, truth = (none if pred_empty else some), (none if truth_empty else some)
    scores = score_case([pred], [truth], ["ET"])["ET"]
    assert scores["dice"] == dice and scores["iou"] == dice
    assert scores["hd95"] == hd


def test_perfect_prediction():
    truth = cube((8, 8, 8), (1, 2, 3), 4)
    scores = score_case([truth], [truth], ["WT"])["WT"]
    assert scores == {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_offset_cubes(k):
    truth = cube((20, 20, 20), (5, 5, 5), 6)
    pred = cube((20, 20, 20), (5, 5, 5 + k), 6)
    assert hd95(pred, truth) == pytest.approx(k)
    assert hd95(pred, truth, spacing=(1.0, 1.0, 2.5)) == pytest.approx(2.5 * k)


def test_summary_is_a_mean_over_cases_not_pooled():
    big = cube((10, 10, 10), (0, 0, 0), 6)
    small = cube((10, 10, 10), (0, 0, 0), 2)
    perfect = score_case([big], [big], ["WT"], with_hd95=False)
    missed = score_case([np.zeros_like(small)], [small], ["WT"], with_hd95=False)
    summary = summarise([perfect, missed], ["WT"])
    assert summary["WT"]["dice"] == pytest.approx(0.5)  # pooled voxels would give ~0.98
    assert summary["WT"]["dice_std"] == pytest.approx(0.5)
