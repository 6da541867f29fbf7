"""Evaluation: one case predicted, postprocessed and scored at its native grid (ensemble.evaluate_case,
with a model whose answer is known), the reports and table it writes, and the enhancing-tumour
label of the maps `evaluate.py --save-predictions` writes. evaluate.py end to end: test_end_to_end.py."""
import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch

import evaluate
from cases.h5 import Case, DataError, write_case
from config import Config, build_config, to_dict
from conftest import SHAPE, TumourDetector, bright_case
from evaluation.ensemble import evaluate_case
from evaluation.export import enhancing_label, export_case
from evaluation.lesions import LESION_KEYS
from evaluation.reports import format_table, write_reports
from model import build_model
from runtime.checkpoint import save_checkpoint
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


def test_an_empty_split_is_refused_saying_what_to_do(tiny_dataset, tmp_path):
    split_file = tmp_path / "split.json"
    why = "no test split: 6 cases, a 15% test split would hold 1 (< data.min_test_cases 10)"
    split_file.write_text(json.dumps({"train": ["case_000"], "val": ["case_001"], "test": [],
                                      "held_out": {"test": why}}))
    with pytest.raises(DataError, match=rf"^{split_file}: no test cases in this run's split \(no test split: 6 "
                                        r"cases.*\); use --split val, or score other cases with --data.dir"):
        evaluate.select_cases(tiny_dataset, "test", str(split_file))
    assert len(evaluate.select_cases(tiny_dataset, "val", str(split_file))) == 1


def test_reports_and_table_say_what_was_scored(tmp_path):
    results = [(f"c{i}", evaluate_case(TumourDetector(), bright_case(f"c{i}"), resize_cfg(), CPU).scores, None)
               for i in range(2)]
    summary = write_reports(str(tmp_path), results, "test", {"task": "brats"})
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert [r["case"] for r in rows] == ["c0", "c1"] and float(rows[0]["WT_dice"]) == 1.0
    assert rows[0]["confidence"] == "" and "least_confident" not in summary   # none computed: none claimed
    assert json.load(open(tmp_path / "summary.json"))["regions"]["ET"]["dice"] == 1.0 == summary["regions"]["ET"]["dice"]
    table = format_table(summary)
    assert "test split, 2 cases: means over cases" in table and "hd95" in table
    assert "lesion" not in table and "lesion_scoring" not in summary


def test_reports_carry_lesion_columns_means_and_summed_counts(tmp_path):
    cases = [bright_case("clean"), bright_case("stray", stray=True)]
    results = [(c.case_id, evaluate_case(TumourDetector(), c, resize_cfg(), CPU, with_lesions=True).scores, None)
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


class HazeOnDimCases(TumourDetector):
    """TumourDetector, except on a case whose last channel is empty: there every voxel gets logit
    0.2 (probability 0.55), a haze just above the threshold: the network cannot tell."""

    def forward(self, x):
        haze = x[:, 3:].abs().flatten(1).amax(1) == 0
        logits = super().forward(x)
        logits[haze] = 0.2
        return logits


def hazy_case(case_id):
    case = bright_case(case_id)
    case.image[3] = 0
    return case


def test_a_hazy_case_is_named_first_among_the_least_confident(tmp_path):
    cases = [bright_case("a"), hazy_case("b"), bright_case("c"), bright_case("d")]
    cases[2].image[:, 1, 1, 1] = 10        # a confident false-positive voxel: lower Dice, still sure
    paths = [write_case(str(tmp_path / "data" / f"{c.case_id}.h5"), c.image, c.mask) for c in cases]
    results = evaluate.evaluate_cases(HazeOnDimCases(), paths, resize_cfg(), CPU)
    confidence = {cid: c for cid, _, c in results}
    assert confidence["b"] < 0.8 < min(confidence[k] for k in "acd") and max(confidence.values()) <= 1.0
    summary = write_reports(str(tmp_path), results, "test", {"task": "brats"})
    assert summary["least_confident"][0] == {"case": "b", "confidence": round(confidence["b"], 5)}
    assert len(summary["least_confident"]) == 4
    rho = summary["confidence_rank_correlation"]
    assert set(rho) == {"mean_dice", "WT", "TC", "ET"} and rho["mean_dice"] > 0
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert list(rows[0])[:2] == ["case", "confidence"]
    assert {r["case"]: float(r["confidence"]) for r in rows} == pytest.approx(confidence, abs=1e-5)
    assert json.load(open(tmp_path / "summary.json"))["least_confident"][0]["case"] == "b"
    table = format_table(summary)
    assert "least confident (no labels needed): b " in table and "Spearman" in table


def test_evaluate_writes_the_confidence_of_every_case(tmp_path):
    for case_id in ("x", "y"):
        case = bright_case(case_id)
        write_case(str(tmp_path / "data" / f"{case_id}.h5"), case.image, case.mask)
    checkpoint = enhancing_everywhere_checkpoint(tmp_path / "run" / "best.pt")   # sure: every voxel at 0.9999
    summary = evaluate.evaluate_checkpoint(checkpoint, "all", str(tmp_path / "eval"),
                                           {"data.dir": str(tmp_path / "data")}, overlays=False)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_case.csv")))
    assert [float(r["confidence"]) for r in rows] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert [c["case"] for c in summary["least_confident"]] == ["x", "y"]
    assert summary["confidence_rank_correlation"]["mean_dice"] is None   # two cases rank nothing
    predicted = evaluate.evaluate_checkpoint(checkpoint, "all", str(tmp_path / "pred"),
                                             {"data.dir": str(tmp_path / "data")}, predict=True)
    assert [c["case"] for c in predicted["least_confident"]] == ["x", "y"]
    assert list(csv.DictReader(open(tmp_path / "pred" / "confidence.csv")))[0]["case"] == "x"


@pytest.mark.parametrize("case_id, attrs, expected", [
    ("BraTS-GLI-00000-000", {"label_convention": "2023"}, 3),
    ("Brats18_2013_2_1", {"label_convention": "2018"}, 4),
    ("BraTS-GLI-00000-000", {"label_convention": "2018"}, 4),   # what the conversion recorded wins
    ("BraTS-MEN-00012-001", {}, 3),                               # no record: a 2023+ name is enough
    ("Brats18_2013_2_1", {}, 7),                                  # neither: the default given
    ("case_000", {}, 7),
])
def test_enhancing_label_follows_the_case_convention(case_id, attrs, expected):
    assert enhancing_label(Case(case_id, np.zeros((4, 2, 2, 2), np.float32), None, attrs=attrs), 7) == expected


def enhancing_everywhere_checkpoint(path):
    """An untrained tiny model whose head answers every region with logit 9: ET at every voxel."""
    cfg = build_config({"data.image_size": "16", "model.base_channels": "4", "model.depth": "2"})
    model = build_model(cfg.model)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(9.0)
    save_checkpoint(str(path), {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0})
    return str(path)


def saved_labels(path):
    if path.endswith(".h5"):
        with h5py.File(path) as f:
            return f["mask"][()]
    return np.asarray(pytest.importorskip("nibabel").load(path).dataobj)


def evaluate_and_read_labels(data_dir, out, checkpoint, case_ids):
    evaluate.main(["-c", checkpoint, "--split", "all", "--out", str(out), "--save-predictions", "--no-overlays",
                   "--data.dir", str(data_dir)])
    found = {name.split(".")[0]: name for name in os.listdir(out / "predictions")}
    assert sorted(found) == sorted(case_ids)
    return {case_id: saved_labels(str(out / "predictions" / found[case_id])) for case_id in case_ids}


def test_saved_predictions_write_enhancing_tumour_in_each_case_convention(tmp_path):
    """BraTS 2023+ writes ET as 3 (4 is the 2024 resection cavity), 2018-21 as 4; an .h5 case
    without a recorded convention is told by its name, else gets eval.enhancing_label."""
    expected = {"BraTS-GLI-00000-000": ("2023", 3), "Brats18_2013_2_1": ("2018", 4),
                "BraTS-GLI-00001-000": (None, 3), "case_000": (None, 4)}
    for case_id, (convention, _) in expected.items():
        case = bright_case(case_id)
        attrs = {"label_convention": convention} if convention else {}
        write_case(str(tmp_path / "data" / f"{case_id}.h5"), case.image, case.mask, **attrs)
    checkpoint = enhancing_everywhere_checkpoint(tmp_path / "run" / "best.pt")
    written = evaluate_and_read_labels(tmp_path / "data", tmp_path / "eval", checkpoint, expected)
    for case_id, (_, label) in expected.items():
        assert written[case_id].shape == SHAPE and set(np.unique(written[case_id]).tolist()) == {label}, case_id


def test_nifti_cases_converted_from_2023_names_get_enhancing_tumour_3(tmp_path):
    """The user's path: BraTS NIfTI folders converted by prepare_data.py, evaluated with
    --save-predictions: each written .nii.gz labels ET as its own source files do."""
    pytest.importorskip("nibabel", reason="NIfTI tests need nibabel: pip install -r requirements-extra.txt")
    import prepare_data
    from layout_fixtures import write_nifti_case

    write_nifti_case(str(tmp_path / "src"), "BraTS-GLI-00000-000", convention="2023")
    write_nifti_case(str(tmp_path / "src"), "Brats18_2013_2_1", convention="2018", seed=1)
    prepare_data.main(["brats", str(tmp_path / "src"), str(tmp_path / "data")])
    checkpoint = enhancing_everywhere_checkpoint(tmp_path / "run" / "best.pt")
    written = evaluate_and_read_labels(tmp_path / "data", tmp_path / "eval", checkpoint,
                                       ["BraTS-GLI-00000-000", "Brats18_2013_2_1"])
    for case_id, label in (("BraTS-GLI-00000-000", 3), ("Brats18_2013_2_1", 4)):
        labels = written[case_id]
        assert labels.shape == (20, 22, 18) and set(np.unique(labels[labels > 0]).tolist()) == {label}, case_id
