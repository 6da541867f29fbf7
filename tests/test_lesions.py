"""Lesion-wise BraTS 2023 figures on hand-made volumes with known answers, and on a real case."""
import os

import numpy as np
import pytest

from evaluation.lesions import LESION_KEYS, MAX_HD95, case_lesion_scores, lesion_scores
from evaluation.metrics import hd95, score_case
from real_brats import SKIP_REASON, sample_cases, source_seg_path
from transforms.regions import labels_to_regions

SHAPE = (21, 23, 25)


def box(mask, z, y, x):
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True


def scene():
    """Four kept truth lesions (4x4x4 = 64 voxels, more than 8 voxels apart on some axis so their
    dilations never merge), one tiny truth lesion (8 voxels) and one spurious predicted cube.
    A: prediction shifted by one voxel along x.  B: two predicted pieces, one inside, one beside it.
    C: missed.  D: perfect.  E: tiny (ignored), predicted exactly.  FP: 8 voxels far from all."""
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(truth, (1, 5), (1, 5), (1, 5))                                              # A
    box(pred, (1, 5), (1, 5), (2, 6))
    box(truth, (1, 5), (14, 18), (1, 5))                                            # B
    box(pred, (1, 5), (14, 18), (1, 3))
    box(pred, (1, 5), (14, 18), (6, 8))                   # 1 voxel gap: within the 3-voxel dilation
    box(truth, (13, 17), (1, 5), (1, 5))                                            # C, missed
    box(truth, (13, 17), (14, 18), (14, 18))                                        # D
    box(pred, (13, 17), (14, 18), (14, 18))
    box(truth, (13, 15), (1, 3), (14, 16))                                          # E, tiny
    box(pred, (13, 15), (1, 3), (14, 16))
    box(pred, (8, 10), (9, 11), (12, 14))                                           # FP
    return pred, truth


def test_several_lesions_one_missed_one_spurious_one_tiny():
    pred, truth = scene()
    # A: 48 of 64 voxels shared -> Dice 96/128. HD95 by hand: of the 56 surface voxels of each cube,
    # 20 lie 1 voxel from the other cube's surface and 36 on it, so the 95th percentile is 1.
    dice_a, hd_a = 96 / 128, 1.0
    assert hd95(pred[1:5, 1:5], truth[1:5, 1:5]) == hd_a
    # B: both pieces match (the union is scored): 32 + 32 predicted voxels, 32 shared -> 64/128.
    b_pred, b_truth = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(b_pred, (1, 5), (14, 18), (1, 3))
    box(b_pred, (1, 5), (14, 18), (6, 8))
    box(b_truth, (1, 5), (14, 18), (1, 5))
    dice_b, hd_b = 0.5, hd95(b_pred, b_truth)
    # C missed: Dice 0, HD95 374.  D perfect: Dice 1, HD95 0.  E ignored.  FP: Dice 0, HD95 374.
    expected_dice = (dice_a + dice_b + 0 + 1 + 0) / 5
    expected_hd95 = (hd_a + hd_b + 374 + 0 + 374) / 5
    scores = lesion_scores(pred, truth)
    assert scores == pytest.approx({"lesion_dice": expected_dice, "lesion_hd95": expected_hd95,
                                    "gt_lesions": 4, "matched_lesions": 3, "fp_lesions": 1})
    assert expected_dice == pytest.approx(0.45)


def test_both_empty_is_perfect_and_truth_empty_spurious_is_worst():
    empty = np.zeros(SHAPE, bool)
    assert lesion_scores(empty, empty) == {"lesion_dice": 1.0, "lesion_hd95": 0.0, "gt_lesions": 0,
                                           "matched_lesions": 0, "fp_lesions": 0}
    spurious = empty.copy()
    spurious[2, 2, 2] = spurious[15, 15, 15] = True       # two components, each a false positive
    assert lesion_scores(spurious, empty) == {"lesion_dice": 0.0, "lesion_hd95": MAX_HD95, "gt_lesions": 0,
                                              "matched_lesions": 0, "fp_lesions": 2}
    missed = empty.copy()
    box(missed, (5, 10), (5, 10), (5, 10))
    assert lesion_scores(empty, missed) == {"lesion_dice": 0.0, "lesion_hd95": MAX_HD95, "gt_lesions": 1,
                                            "matched_lesions": 0, "fp_lesions": 0}


def test_only_tiny_truth_lesions_and_no_false_positive_scores_as_empty():
    truth = np.zeros(SHAPE, bool)
    box(truth, (3, 5), (3, 5), (3, 5))
    assert lesion_scores(np.zeros(SHAPE, bool), truth)["lesion_dice"] == 1.0    # 0 / 0 -> 1, as official


@pytest.mark.parametrize("voxels, spacing, kept", [(50, None, False), (51, None, True),
                                                    (25, (1.0, 1.0, 2.0), False), (26, (1.0, 1.0, 2.0), True)])
def test_lesions_of_at_most_50_cubic_mm_are_ignored(voxels, spacing, kept):
    slab = np.zeros((2, 5, 6), bool)
    slab.reshape(-1)[:voxels] = True                        # filled row by row: one connected piece
    truth = np.zeros(SHAPE, bool)
    truth[5:7, 5:10, 5:11] = slab
    assert truth.sum() == voxels
    scores = lesion_scores(np.zeros(SHAPE, bool), truth, spacing)
    assert scores["gt_lesions"] == int(kept) and scores["lesion_dice"] == (0.0 if kept else 1.0)


@pytest.mark.parametrize("offset, matched", [((3, 0, 0), True), ((4, 0, 0), False), ((3, 3, 0), True),
                                             ((3, 3, 1), False), ((2, 2, 2), True), ((3, 2, 2), False)])
def test_dilation_is_three_steps_of_the_18_neighbourhood(offset, matched):
    """A predicted voxel beyond a lesion's corner matches when 3 dilations with the 18-neighbourhood
    reach it: at most 3 voxels per axis and 6 in all (a full 3x3x3 element would reach (3, 3, 3))."""
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(truth, (2, 7), (2, 7), (2, 7))                        # 125 voxels, corner at (6, 6, 6)
    pred[tuple(6 + o for o in offset)] = True
    scores = lesion_scores(pred, truth)
    assert (scores["matched_lesions"], scores["fp_lesions"]) == ((1, 0) if matched else (0, 1))
    assert scores["lesion_dice"] == 0.0                       # the voxel lies outside the lesion either way
    assert (scores["lesion_hd95"] < MAX_HD95) if matched else (scores["lesion_hd95"] == MAX_HD95)


def test_truth_lesions_whose_dilations_touch_are_one_lesion():
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(truth, (2, 6), (2, 6), (2, 6))
    box(truth, (2, 6), (2, 6), (12, 16))          # 6 voxels apart: 3 + 3 dilations touch -> merged
    box(pred, (2, 6), (2, 6), (2, 6))             # only the first half predicted
    scores = lesion_scores(pred, truth)
    assert scores["gt_lesions"] == 1 and scores["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))
    far = truth.copy()
    far[:, :, 12:16] = False
    box(far, (2, 6), (2, 6), (13, 17))            # 7 voxels apart: two lesions, one missed
    scores = lesion_scores(pred, far)
    assert scores["gt_lesions"] == 2 and scores["lesion_dice"] == pytest.approx(0.5)


def test_case_scores_each_region_and_bad_shapes_are_refused():
    pred, truth = scene()
    empty = np.zeros(SHAPE, bool)
    scores = case_lesion_scores(np.stack([pred, empty]), np.stack([truth, empty]), ["WT", "ET"], (1, 1, 1))
    assert scores["WT"]["lesion_dice"] == pytest.approx(0.45) and scores["ET"]["lesion_dice"] == 1.0
    assert tuple(scores["WT"]) == LESION_KEYS           # the columns the reports will carry
    with pytest.raises(ValueError, match="region WT"):
        lesion_scores(pred[:-1], truth, region="WT")


@pytest.mark.skipif(not sample_cases(), reason=SKIP_REASON)
def test_spurious_lesion_on_a_real_case_lowers_lesion_dice_below_legacy_dice():
    nib = pytest.importorskip("nibabel", reason="nibabel is needed to read the real BraTS segmentation")
    seg = nib.load(source_seg_path(sample_cases()[0]))
    truth = labels_to_regions(np.asarray(seg.dataobj)).numpy() > 0.5
    spacing = tuple(float(z) for z in seg.header.get_zooms()[:3])
    pred = truth.copy()
    assert not truth[0, :20, :20, :20].any()                  # the corner is far from the tumour
    pred[:, 5:10, 5:10, 5:10] = True                          # a spurious lesion in every region
    perfect = case_lesion_scores(truth, truth, ["WT", "TC", "ET"], spacing)
    spoiled = case_lesion_scores(pred, truth, ["WT", "TC", "ET"], spacing)
    legacy = score_case(pred, truth, ["WT", "TC", "ET"], spacing, with_hd95=False)
    for region in ("WT", "TC", "ET"):
        assert perfect[region]["lesion_dice"] == 1.0 and perfect[region]["lesion_hd95"] == 0.0
        assert perfect[region]["fp_lesions"] == 0 and spoiled[region]["fp_lesions"] == 1
        kept = spoiled[region]["gt_lesions"]
        assert kept >= 1 and spoiled[region]["matched_lesions"] == kept
        assert spoiled[region]["lesion_dice"] == pytest.approx(kept / (kept + 1))
        assert spoiled[region]["lesion_dice"] < legacy[region]["dice"] < 1.0


def test_agrees_with_the_official_scorer_where_installed(tmp_path):
    """Counts and lesion-wise Dice against rachitsaluja/BraTS-2023-Metrics (HD95 is left out: the
    official scorer measures surface distances with another implementation)."""
    official = pytest.importorskip("brats_2023_metrics.surface_distance.brats_metrics",
                                   reason="the official BraTS 2023 scorer (brats_2023_metrics) is not installed")
    nib = pytest.importorskip("nibabel")
    pred, truth = scene()
    paths = {}
    for name, mask in (("pred", pred), ("truth", truth)):
        paths[name] = os.path.join(tmp_path, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8) * 3, np.eye(4)), paths[name])   # 3: 2023 ET label
    table = official.get_lesion_wise_results(paths["pred"], paths["truth"], "BraTS-GLI").set_index("Labels")
    ours = lesion_scores(pred, truth)
    for region in ("WT", "TC", "ET"):
        row = table.loc[region]
        assert (row["Num_TP"], row["Num_FP"]) == (ours["matched_lesions"], ours["fp_lesions"])
        assert row["Lesion_Wise_Score_Dice"] == pytest.approx(ours["lesion_dice"])
