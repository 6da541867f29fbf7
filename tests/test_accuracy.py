"""The accuracy benchmark: patient-level test sets, and one tiny recipe trained and scored end to end."""
import json
import os

import pytest

import bench
from benchmarks import accuracy
from cases.h5 import case_id_of
from cases.splits import list_cases
from layout_fixtures import write_lgg_patient
from prepare_data import main as prepare_main

SCANS = ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000",
         "BraTS-GLI-00004-000", "BraTS-GLI-00005-000", "BraTS-GLI-00005-001", "BraTS-GLI-00006-000"]


def patient(case_id):
    return case_id.rsplit("-", 1)[0]


def test_one_test_set_holds_about_30_percent_of_the_patients_whole():
    (test,) = accuracy.patient_folds(SCANS, seed=3)
    assert len({patient(c) for c in test}) == 2                    # round(6 patients * 0.3)
    assert all(c in test for c in SCANS if patient(c) in {patient(t) for t in test})
    assert accuracy.patient_folds(SCANS, seed=3) == [test]         # a pure function of the seed


@pytest.mark.parametrize("folds", [2, 3, 6])
def test_folds_cover_every_patient_once(folds):
    tests = accuracy.patient_folds(SCANS, folds)
    assert len(tests) == folds and sorted(c for t in tests for c in t) == sorted(SCANS)
    for a in range(folds):
        for b in range(a + 1, folds):
            assert not {patient(c) for c in tests[a]} & {patient(c) for c in tests[b]}


def test_impossible_folds_are_refused():
    with pytest.raises(ValueError, match="--folds 7: choose 2 to 6"):
        accuracy.patient_folds(SCANS, 7)
    with pytest.raises(ValueError, match="too few"):
        accuracy.patient_folds(["a", "b"], 2)


def test_a_tiny_recipe_is_trained_scored_and_tabled(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training processes, on a shared machine
    work = tmp_path / "work"
    result = bench.main(["--accuracy", "--data.dir", tiny_dataset, "--train.max_minutes", "0.05",
                         "--recipe", "planned", "--work", str(work), "--data.image_size", "16",
                         "--model.base_channels", "4", "--model.depth", "2", "--train.epochs", "1"])
    saved = json.load(open(work / "accuracy.json"))
    assert saved == json.loads(json.dumps(result))
    (test,) = saved["test_sets"]
    assert len(test) == 2 and set(test) < {case_id_of(p) for p in list_cases(tiny_dataset)}
    planned = saved["recipes"]["planned"]
    assert planned["cases"] == 2 and [row["case"] for row in planned["per_case"]] == test
    for region in ("WT", "TC", "ET"):
        assert 0 <= planned["dice"][region] <= 1 and 0 <= planned["hd95"][region] <= 373.13
    assert planned["minutes"] > 0 and saved["overrides"]["data.image_size"] == "16"
    assert sorted(os.listdir(work / "fold0" / "test_cases")) == [f"{c}.h5" for c in test]
    assert os.path.isfile(work / "fold0" / "planned" / "train" / "best.pt")
    for row in planned["per_case"]:  # scored once more with postprocessing off, next to the shipped figures
        assert {f"raw_{r}_{m}" for r in ("WT", "TC", "ET") for m in ("dice", "sensitivity")} <= set(row)
    assert set(planned["raw_dice"]) == {"WT", "TC", "ET"} and len(planned["steps_per_run"]) == 1
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["recipe", "Dice", "WT", "±"]
    assert table.splitlines()[1].startswith("planned") and f"{planned['dice']['WT']:.3f}" in table


def test_a_detection_that_postprocessing_halved_is_named():
    rows = [{"case": "kept", "WT_dice": "0.80", "raw_WT_dice": "0.82", "raw_WT_sensitivity": "0.9"},
            {"case": "lost", "WT_dice": "0.00", "raw_WT_dice": "0.42", "raw_WT_sensitivity": "0.99"},
            {"case": "never found", "WT_dice": "0.00", "raw_WT_dice": "0.05", "raw_WT_sensitivity": "0.1"}]
    assert accuracy.halved_detections(rows, "WT") == ["lost"]
    summary = accuracy.summarise_recipe(rows, [1.0], ["WT"], [{"planned": 10, "made": 9}])
    assert summary["under_half"] == ["lost", "never found"] and summary["detections_halved"] == ["lost"]
    assert summary["dice_worst"]["WT"] == 0.0 and summary["raw_dice"]["WT"] == pytest.approx(1.29 / 3)
    assert summary["hd95"] == {}  # no HD95 column: not scored, not invented


def test_a_run_without_a_budget_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(SystemExit, match="train.max_minutes"):
        accuracy.main(["--data.dir", tiny_dataset, "--work", str(tmp_path)])


def test_the_binary_task_is_benchmarked_with_a_preset(tmp_path, monkeypatch, capsys):
    """--preset lgg2d on five tiny kaggle_3m patients: the tumour region is scored, raw and shipped."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for i in range(5):
        write_lgg_patient(str(tmp_path), f"TCGA_XX_{i:04d}_2000010{i}", n_slices=8, size=64, seed=i)
    prepare_main(["lgg", str(tmp_path / "kaggle_3m"), str(tmp_path / "h5")])
    result = accuracy.main(["--preset", "lgg2d", "--data.dir", str(tmp_path / "h5"), "--train.max_minutes", "0.05",
                            "--recipe", "planned", "--folds", "2", "--work", str(tmp_path / "work"),
                            "--data.image_size", "32,32", "--model.base_channels", "4", "--model.depth", "2",
                            "--data.num_workers", "0"])
    planned = result["recipes"]["planned"]
    assert result["preset"] == "lgg2d" and planned["cases"] == 5 and list(planned["dice"]) == ["tumour"]
    assert all("raw_tumour_dice" in row for row in planned["per_case"])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe"))
    assert header.split()[:3] == ["recipe", "Dice", "tumour"]
