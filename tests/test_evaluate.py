"""Evaluation: one case predicted, postprocessed and scored at its native grid (scoring.evaluate_case,
with a model whose answer is known), and the reports and table it writes. evaluate.py end to end:
test_end_to_end.py."""
import csv
import json

import h5py
import numpy as np
import torch

from config import Config
from conftest import SHAPE, TumourDetector, bright_case
from evaluation.ensemble import evaluate_case
from evaluation.export import export_case
from evaluation.lesions import LESION_KEYS
from evaluation.reports import format_table, write_reports
from transforms.regions import labels_to_regions

CPU = torch.device("cpu")


def resize_cfg(**eval_keys):
    cfg = Config()
    cfg.data.image_size = SHAPE  # the native grid: the resize is the identity
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    return cfg


def test_a_known_answer_scores_dice_1_and_the_threshold_is_honoured():
    result = evaluate_case(TumourDetector(), bright_case(), resize_cfg(), CPU)
    assert result.pred.shape == (3, *SHAPE) and result.truth.shape == (3, *SHAPE)
    assert {region: s["dice"] for region, s in result.scores.items()} == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert all(s["hd95"] == 0.0 for s in result.scores.values())
    silent = evaluate_case(TumourDetector(), bright_case(), resize_cfg(threshold=1.0), CPU, with_hd95=False)
    assert not silent.pred.any() and silent.scores["WT"]["dice"] == 0.0 and "hd95" not in silent.scores["WT"]


def test_postprocessing_is_applied_before_scoring():
    stray = bright_case(stray=True)
    plain = evaluate_case(TumourDetector(), stray, resize_cfg(), CPU, with_hd95=False)
    cleaned = evaluate_case(TumourDetector(), stray, resize_cfg(largest_component=True), CPU, with_hd95=False)
    assert plain.scores["WT"]["dice"] < 1.0 and cleaned.scores["WT"]["dice"] == 1.0


class EnhancingOnly(TumourDetector):
    """Finds the tumour in the ET channel only: WT and TC say "nothing" everywhere."""

    def forward(self, x):
        logits = super().forward(x)
        return torch.cat([torch.full_like(logits[:, :2], -20.0), logits[:, 2:]], dim=1)


def test_scored_regions_are_those_of_the_label_map_not_the_raw_channels(tmp_path):
    """ET outside the predicted WT and TC is ET in the label map, hence WT and TC too: scored as
    such (the raw channels would give WT and TC Dice 0), and exactly what export writes."""
    case = bright_case()
    result = evaluate_case(EnhancingOnly(), case, resize_cfg(), CPU)
    assert {region: s["dice"] for region, s in result.scores.items()} == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    written = export_case(str(tmp_path), case, result.pred, overlay=False)[0]
    with h5py.File(written) as f:
        exported = f["mask"][()]
    assert (exported == case.mask).all()
    np.testing.assert_array_equal(labels_to_regions(exported).numpy() > 0.5, result.pred)


def test_lesion_wise_figures_only_when_asked():
    stray = bright_case(stray=True)                      # the stray voxel: one false-positive lesion
    plain = evaluate_case(TumourDetector(), stray, resize_cfg(), CPU)
    assert not set(LESION_KEYS) & set(plain.scores["WT"])
    scored = evaluate_case(TumourDetector(), stray, resize_cfg(), CPU, with_lesions=True).scores
    for region in ("WT", "TC", "ET"):                    # the 64-voxel tumour is above 50 mm^3
        assert {k: scored[region][k] for k in LESION_KEYS[2:]} == {"gt_lesions": 1, "matched_lesions": 1,
                                                                    "fp_lesions": 1}
        assert scored[region]["lesion_dice"] == 0.5 < scored[region]["dice"] < 1.0


def test_an_unlabelled_case_is_predicted_not_scored():
    result = evaluate_case(TumourDetector(), bright_case(with_mask=False), resize_cfg(), CPU)
    assert result.truth is None and result.scores == {} and result.pred[0].sum() == 4 * 4 * 4


def test_reports_and_table_say_what_was_scored(tmp_path):
    results = [(f"c{i}", evaluate_case(TumourDetector(), bright_case(f"c{i}"), resize_cfg(), CPU).scores)
               for i in range(2)]
    summary = write_reports(str(tmp_path), results, "test", {"task": "brats"})
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert [r["case"] for r in rows] == ["c0", "c1"] and float(rows[0]["WT_dice"]) == 1.0
    assert json.load(open(tmp_path / "summary.json"))["regions"]["ET"]["dice"] == 1.0 == summary["regions"]["ET"]["dice"]
    table = format_table(summary)
    assert "test split, 2 cases: means over cases" in table and "hd95" in table
    assert "lesion" not in table and "lesion_scoring" not in summary


def test_reports_carry_lesion_columns_means_and_summed_counts(tmp_path):
    cases = [bright_case("clean"), bright_case("stray", stray=True)]
    results = [(c.case_id, evaluate_case(TumourDetector(), c, resize_cfg(), CPU, with_lesions=True).scores)
               for c in cases]
    summary = write_reports(str(tmp_path), results, "test", {"task": "brats"})
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    for region in ("WT", "TC", "ET"):
        assert [float(r[f"{region}_lesion_dice"]) for r in rows] == [1.0, 0.5]
        assert [int(r[f"{region}_fp_lesions"]) for r in rows] == [0, 1]
        figures = summary["regions"][region]
        assert figures["lesion_dice"] == 0.75 and figures["lesion_dice_median"] == 0.75
        assert (figures["gt_lesions"], figures["matched_lesions"], figures["fp_lesions"]) == (2, 2, 1)
        assert "gt_lesions_std" not in figures
    rules = json.load(open(tmp_path / "summary.json"))["lesion_scoring"]
    assert rules["connectivity"] == 26 and rules["dilation"] == {"iterations": 3, "neighbourhood": 18}
    assert (rules["min_lesion_mm3"], rules["max_hd95_mm"]) == (50.0, 374.0)
    table = format_table(summary).splitlines()
    assert "lesion_dice" in table[6] and "fp_lesions" in table[6]
    assert table[9].split() == ["ET", "0.7500", f"{summary['regions']['ET']['lesion_hd95']:.4f}", "2", "2", "1"]
