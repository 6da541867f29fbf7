"""Acceptance: the scores evaluate.py reports are the scores of the files it exports.

The shared real BraTS 2018 cases are converted with the project's converter, a tiny model is trained
briefly (resize mode, small grid: its predictions overlap the tumours without matching them), and
`evaluate.py --save-predictions` writes per_case.csv and NIfTI label maps. The exported files are
then re-scored here without metrics.py, postprocess.py or transforms.py: regions from the labels,
voxel counts, and an HD95 of our own (surfaces by neighbour shifts, distances by k-d tree) that
test_reference_hd95_matches_brute_force checks against all-pairs distances.
"""
import csv
import json
import os

import numpy as np
import pytest
from scipy.spatial import cKDTree

import real_brats
from evaluation.metrics import hd95 as project_hd95

EMPTY_HD95 = 373.13                                       # BraTS: exactly one of the two masks empty
LABELS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}      # BraTS 2018 regions of a label map
LEGACY = ("dice", "iou", "sensitivity", "specificity", "hd95")
LESION = ("lesion_dice", "lesion_hd95", "gt_lesions", "matched_lesions", "fp_lesions")


def surface_mm(mask, spacing):
    """Positions (mm) of the voxels of `mask` with a face neighbour outside it or beyond the edge."""
    padded = np.pad(mask, 1)
    interior = np.ones(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis)[(slice(1, -1),) * mask.ndim]
    return np.argwhere(mask & ~interior) * np.asarray(spacing, float)


def empty_rule(pred, truth):
    if not pred.any() and not truth.any():
        return 0.0
    return EMPTY_HD95 if not pred.any() or not truth.any() else None


def reference_hd95(pred, truth, spacing):
    """95th percentile of both directed surface-distance sets together (k-d tree)."""
    rule = empty_rule(pred, truth)
    if rule is not None:
        return rule
    a, b = surface_mm(pred, spacing), surface_mm(truth, spacing)
    return float(np.percentile(np.concatenate([cKDTree(b).query(a)[0], cKDTree(a).query(b)[0]]), 95))


def brute_force_hd95(pred, truth, spacing):
    rule = empty_rule(pred, truth)
    if rule is not None:
        return rule
    a, b = surface_mm(pred, spacing), surface_mm(truth, spacing)
    distances = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def rescore(labels, truth_labels, spacing):
    """{region: {metric: value}} of a label map against a truth label map, BraTS empty rules."""
    scores = {}
    for region, wanted in LABELS.items():
        pred, truth = np.isin(labels, wanted), np.isin(truth_labels, wanted)
        tp, fp = np.sum(pred & truth), np.sum(pred & ~truth)
        fn, tn = np.sum(~pred & truth), np.sum(~pred & ~truth)
        if tp + fn == 0:
            hit = float(fp == 0)
            dice = iou = sensitivity = hit
        else:
            dice, iou, sensitivity = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn), tp / (tp + fn)
        scores[region] = {"dice": dice, "iou": iou, "sensitivity": sensitivity, "specificity": tn / (tn + fp),
                          "hd95": reference_hd95(pred, truth, spacing)}
    return scores


def random_blobs(rng, shape, fill):
    from scipy import ndimage
    return ndimage.binary_opening(rng.random(shape) < fill) | (rng.random(shape) < 0.02)


@pytest.mark.parametrize("seed", range(6))
def test_reference_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 12, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.5, 2.5, 3))
    pred, truth = random_blobs(rng, shape, 0.5), random_blobs(rng, shape, 0.4)
    pred[0, 0, 0] = truth[-1, -1, -1] = True              # never empty; voxels on the edge count as surface
    expected = brute_force_hd95(pred, truth, spacing)
    assert expected > 0
    assert reference_hd95(pred, truth, spacing) == pytest.approx(expected, abs=1e-9)
    assert project_hd95(pred, truth, spacing) == pytest.approx(expected, abs=1e-9)   # and metrics.hd95 too
    empty = np.zeros(shape, bool)
    assert brute_force_hd95(empty, empty, spacing) == 0.0 == project_hd95(empty, empty, spacing)
    assert reference_hd95(empty, truth, spacing) == EMPTY_HD95 == project_hd95(pred, empty, spacing)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(per_case rows, summary, predictions folder) of a briefly trained tiny model on the real cases."""
    if not real_brats.sample_cases():
        pytest.skip(real_brats.SKIP_REASON)
    pytest.importorskip("nibabel", reason="nibabel is needed to convert and read the real BraTS cases")
    import evaluate
    import main

    root = tmp_path_factory.mktemp("real_scoring")
    data = real_brats.convert_all(str(root / "h5"))
    # resized cases are cached after the first epoch, so later epochs take a fraction of a second each;
    # 20 of them at a high rate give predictions that overlap every region without matching it
    run_dir = main.train_and_evaluate(main.build_config({
        "data.dir": data, "data.image_size": "32", "data.val_fraction": "0", "data.test_fraction": "0",
        "data.num_workers": "0", "data.augment": "false", "model.base_channels": "4", "model.depth": "2",
        "train.epochs": "20", "train.batch_size": "1", "train.lr": "0.03", "train.out_dir": str(root),
        "train.name": "tiny"}))
    out = root / "eval"
    evaluate.main(["--checkpoint", os.path.join(run_dir, "best.pt"), "--split", "all", "--out", str(out),
                   "--save-predictions", "--no-overlays", "--eval.postprocess_et_min", "50"])
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "summary.json") as f:
        return rows, json.load(f), out / "predictions"


def test_reported_scores_are_those_of_the_exported_files(evaluated):
    import nibabel as nib

    rows, _, predictions = evaluated
    assert sorted(r["case"] for r in rows) == real_brats.sample_cases()
    worst = {"scores": 0.0, "hd95": 0.0}
    dice = {region: [] for region in LABELS}
    for row in rows:
        source = nib.load(real_brats.source_seg_path(row["case"]))
        exported = nib.load(os.path.join(predictions, f"{row['case']}.nii.gz"))
        assert exported.shape == source.shape
        np.testing.assert_array_equal(exported.affine, source.affine)
        labels = np.asarray(exported.dataobj)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
        spacing = tuple(float(z) for z in source.header.get_zooms()[:3])
        ours = rescore(labels, np.asarray(source.dataobj), spacing)
        for region, figures in ours.items():
            dice[region].append(figures["dice"])
            for metric, value in figures.items():
                reported = float(row[f"{region}_{metric}"])
                kind = "hd95" if metric == "hd95" else "scores"
                worst[kind] = max(worst[kind], abs(reported - value))
                assert reported == pytest.approx(value, abs=1e-3 if kind == "hd95" else 1e-4), \
                    f"{row['case']} {region} {metric}: per_case.csv {reported}, exported file {value}"
    for region, values in dice.items():                   # the predictions are neither empty nor perfect
        assert 0.05 < np.mean(values) < 0.99, f"{region}: trivial predictions (Dice {values})"
    print(f"largest difference, per_case.csv vs exported files: scores {worst['scores']:.2e}, "
          f"HD95 {worst['hd95']:.2e} mm")


def test_evaluation_reports_lesion_wise_figures(evaluated):
    rows, summary, _ = evaluated
    assert list(rows[0]) == ["case", "confidence"] + [f"{r}_{m}" for r in LABELS for m in LEGACY + LESION]
    rules = summary["lesion_scoring"]
    assert rules["connectivity"] == 26 and rules["min_lesion_mm3"] == 50.0 and rules["max_hd95_mm"] == 374.0
    for region in LABELS:
        figures = summary["regions"][region]
        per_case = {m: [float(r[f"{region}_{m}"]) for r in rows] for m in LESION}
        assert figures["lesion_dice"] == pytest.approx(np.mean(per_case["lesion_dice"]), abs=1e-4)
        for count in LESION[2:]:                           # counts are summed over cases
            assert figures[count] == sum(per_case[count]) and f"{count}_std" not in figures
        assert 1 <= figures["gt_lesions"] and figures["matched_lesions"] <= figures["gt_lesions"]
        assert all(0 <= d <= 1 for d in per_case["lesion_dice"])
        assert all(0 <= h <= 374 for h in per_case["lesion_hd95"])
