"""Evaluation: one case predicted, postprocessed and scored at its native grid (scoring.evaluate_case,
with a model whose answer is known), and the reports and table it writes. evaluate.py end to end:
test_end_to_end.py."""
import csv
import json

import torch

from config import Config
from conftest import SHAPE, TumourDetector, bright_case
from reporting import format_table, write_reports
from scoring import evaluate_case

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
