"""Lesion-wise BraTS 2023 figures on hand-made volumes with known answers, HD95 against a brute-force
reference, and the official scorers where they are installed."""
import os

import numpy as np
import pytest

from evaluation.lesions import LESION_KEYS, MAX_HD95, case_lesion_scores, lesion_scores, robust_hd95
from evaluation.metrics import hd95, score_case
from real_brats import SKIP_REASON, sample_cases, source_seg_path
from transforms.regions import labels_to_regions

SHAPE = (21, 23, 25)
OFFICIAL_SKIP = ("the official BraTS scorer is not installed: pip install brats-evaluation, in an environment of "
                 "its own (it needs numpy < 2.3)")


def box(mask, z, y, x):
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True


def brute_one_way(a, b, spacing=(1.0, 1.0, 1.0)):
    """Distances (mm) from every surface voxel of `a` to the nearest surface voxel of `b`, pair by
    pair; a surface voxel has a face neighbour outside its mask (or outside the array)."""
    def surface(mask):
        padded, inner = np.pad(mask, 1), mask.copy()
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)
    pa, pb = surface(a), surface(b)
    return np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1)


def brute_robust_hd95(pred, truth, spacing=(1.0, 1.0, 1.0)):
    return max(np.percentile(brute_one_way(pred, truth, spacing), 95),
               np.percentile(brute_one_way(truth, pred, spacing), 95))


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
    assert brute_robust_hd95(pred[1:5, 1:5], truth[1:5, 1:5]) == hd_a
    # B: both pieces match (the union is scored): 32 + 32 predicted voxels, 32 shared -> 64/128.
    b_pred, b_truth = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(b_pred, (1, 5), (14, 18), (1, 3))
    box(b_pred, (1, 5), (14, 18), (6, 8))
    box(b_truth, (1, 5), (14, 18), (1, 5))
    dice_b, hd_b = 0.5, brute_robust_hd95(b_pred, b_truth)
    # C missed: Dice 0, HD95 374.  D perfect: Dice 1, HD95 0.  E ignored.  FP: Dice 0, HD95 374.
    expected_dice = (dice_a + dice_b + 0 + 1 + 0) / 5
    expected_hd95 = (hd_a + hd_b + 374 + 0 + 374) / 5
    scores = lesion_scores(pred, truth)
    assert scores == pytest.approx({"lesion_dice": expected_dice, "lesion_hd95": expected_hd95,
                                    "gt_lesions": 4, "matched_lesions": 3, "fp_lesions": 1})
    assert expected_dice == pytest.approx(0.45)


def test_a_lesion_hd95_is_the_larger_one_way_percentile_while_global_hd95_pools_both():
    """A line of 20 voxels (3 mm^3 each: 60 mm^3, kept) predicted with a 10-voxel arm at right angles.
    Truth to prediction: 20 distances 0. Prediction to truth: 20 zeros and 1..10 mm; its 95th
    percentile (rank 0.95 * 29 = 27.55 of the sorted 30) is 8.55. Pooled, the 50 distances have
    their 95th percentile at rank 46.55: 7.55."""
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    truth[10, 5, 2:22] = True
    pred[10, 5, 2:22] = pred[10, 6:16, 10] = True
    spacing = (3.0, 1.0, 1.0)                           # the line and the arm lie across the 1 mm axes
    assert brute_robust_hd95(pred, truth, spacing) == pytest.approx(8.55)
    assert robust_hd95(pred, truth, spacing) == pytest.approx(8.55)
    assert hd95(pred, truth, spacing) == pytest.approx(7.55)  # the global figure (medpy, panoptica)
    scores = lesion_scores(pred, truth, spacing)
    assert scores == pytest.approx({"lesion_dice": 40 / 50, "lesion_hd95": 8.55, "gt_lesions": 1,
                                    "matched_lesions": 1, "fp_lesions": 0})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_hd95_and_global_hd95_match_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.choice([0.5, 1.0, 2.0], 3))
    pred, truth = (rng.random((9, 10, 11)) < share for share in (0.2, 0.3))
    one_way = brute_one_way(pred, truth, spacing), brute_one_way(truth, pred, spacing)
    assert robust_hd95(pred, truth, spacing) == pytest.approx(max(np.percentile(d, 95) for d in one_way))
    assert hd95(pred, truth, spacing) == pytest.approx(np.percentile(np.concatenate(one_way), 95))


def test_voxels_touching_only_at_corners_are_one_component():
    """A 4x4x4 lesion predicted exactly, plus a staircase of 6 voxels leaving its corner diagonally
    (each touching the next only at a corner), plus a 4-voxel diagonal staircase far from it. With
    26-connectivity both staircases are whole components: the first joins the lesion's match (the
    steps beyond the dilation's reach included), the second is one false positive. HD95 by hand:
    56 surface voxels at 0 and steps at k * sqrt(3), k = 1..6; rank 0.95 * 61 = 57.95 -> 2.95 sqrt(3)."""
    truth, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box(truth, (2, 6), (2, 6), (2, 6))
    box(pred, (2, 6), (2, 6), (2, 6))
    for k in range(1, 7):
        pred[5 + k, 5 + k, 5 + k] = True
    for k in range(4):
        pred[15 + k, 2 + k, 15 + k] = True
    scores = lesion_scores(pred, truth)
    assert (scores["gt_lesions"], scores["matched_lesions"], scores["fp_lesions"]) == (1, 1, 1)
    assert scores["lesion_dice"] == pytest.approx((2 * 64 / (70 + 64) + 0) / 2)
    assert scores["lesion_hd95"] == pytest.approx((2.95 * np.sqrt(3) + MAX_HD95) / 2)


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


def test_agrees_with_the_2023_scorer_where_installed(tmp_path):
    """Counts and lesion-wise Dice against rachitsaluja/BraTS-2023-Metrics (HD95 is left out: its
    surface-distance package measures between surface elements on another grid, docs/evaluation.md)."""
    official = pytest.importorskip("brats_2023_metrics.surface_distance.brats_metrics",
                                   reason="the BraTS 2023 scorer is not installed (it is not on PyPI: pip install "
                                          "git+https://github.com/rachitsaluja/BraTS-2023-Metrics, in an "
                                          "environment of its own, as it pins numpy 1.24)")
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


@pytest.mark.skipif(not sample_cases(), reason=SKIP_REASON)
def test_global_scores_and_counts_agree_with_the_official_scorer_on_a_real_case(tmp_path):
    """Global Dice and HD95 against panoptica with brats-evaluation's BraTS-GLI config (the official
    scorer since 2024) on a real case, predicted shifted by 2 voxels: equal.
    Lesion counts follow other rules there: panoptica splits each region into 26-connected components
    and matches them one to one on any overlap (maximum bipartite matching, Dice > 1e-6), without the
    2023 code's dilation merge or its 50 mm^3 floor. On the truth plus one far spurious cube both find
    that one false positive and no miss; panoptica's true positives are the truth's components, at
    least as many as the lesions they merge into here."""
    pytest.importorskip("brats_evaluation", reason=OFFICIAL_SKIP)
    nib = pytest.importorskip("nibabel", reason="nibabel is needed to write the NIfTI files it scores")
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator
    seg = nib.load(source_seg_path(sample_cases()[0]))
    truth = np.asarray(seg.dataobj).astype(np.uint8)
    truth[truth == 4] = 3                                     # the config reads BraTS 2023 labels
    spurious = truth.copy()
    assert not truth[:20, :20, :20].any()
    spurious[5:15, 5:15, 5:15] = 3
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    labels = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    spacing = tuple(float(z) for z in seg.header.get_zooms()[:3])
    for name, pred in (("shifted", np.roll(truth, 2, axis=0)), ("spurious", spurious)):
        paths = [str(tmp_path / f"{name}_{kind}.nii.gz") for kind in ("pred", "truth")]
        for path, labels_map in zip(paths, (pred, truth)):
            nib.save(nib.Nifti1Image(labels_map, seg.affine), path)
        theirs = {k.upper(): r.to_dict(True) for k, r in evaluator.evaluate(*paths).items()}
        regions = [np.stack([np.isin(m, v) for v in labels.values()]) for m in (pred, truth)]
        ours = score_case(*regions, list(labels), spacing)
        lesions = case_lesion_scores(*regions, list(labels), spacing)
        for region in labels:
            assert ours[region]["dice"] == pytest.approx(theirs[region]["global_bin_dsc"], abs=1e-9)
            assert ours[region]["hd95"] == pytest.approx(theirs[region]["global_bin_hd95"], abs=1e-6)
            if name == "spurious":
                assert (theirs[region]["fp"], theirs[region]["fn"]) == (lesions[region]["fp_lesions"], 0) == (1, 0)
                assert theirs[region]["tp"] >= lesions[region]["gt_lesions"] == lesions[region]["matched_lesions"]
