"""Cross-validation: --data.fold all trains every fold into RUN/fold_<i> on patient-level folds that
never touch the test split, and the folds' ensemble evaluates on that test split."""
import json
import os

import numpy as np
import pytest

import evaluate
import main
from cases.h5 import write_case
from cases.patients import patient_id
from config import build_config, check
from conftest import blob_case
from runtime.checkpoint import load_checkpoint

TINY = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--train.epochs", "1",
        "--data.num_workers", "0", "--train.batch_size", "2", "--data.test_fraction", "0.15"]


def write_patients(folder, n_patients=9, shape=(16, 18, 16)):
    """BraTS 2023-named cases; every third patient has a second scan."""
    rng = np.random.default_rng(0)
    for p in range(n_patients):
        for scan in range(1 + (p % 3 == 0)):
            image, mask = blob_case(rng, shape)
            write_case(os.path.join(folder, f"BraTS-GLI-{p:05d}-{scan:03d}.h5"), image, mask)
    return str(folder)


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_three_folds_train_on_disjoint_patients_and_their_ensemble_evaluates(tmp_path):
    data = write_patients(tmp_path / "data")
    main.main(["--data.dir", data, "--train.out_dir", str(tmp_path / "runs"), "--train.name", "cv",
               "--data.folds", "3", "--data.fold", "all", *TINY])
    run_dir = tmp_path / "runs" / "cv"
    splits = [read_json(run_dir, f"fold_{i}", "split.json") for i in range(3)]
    test_patients = {patient_id(c) for c in splits[0]["test"]}
    val_patients = [{patient_id(c) for c in s["val"]} for s in splits]
    assert test_patients and all(s["test"] == splits[0]["test"] for s in splits)
    assert sum(map(len, val_patients)) == len(set().union(*val_patients)) == 9 - len(test_patients)
    for fold, split in enumerate(splits):
        assert not val_patients[fold] & test_patients
        assert not {patient_id(c) for c in split["train"]} & (test_patients | val_patients[fold])
        assert split["fold"] == fold and split["folds"] == 3 and split["grouping"]["patients"] == 9
        assert read_json(run_dir, f"fold_{fold}", "config.json")["data"]["fold"] == str(fold)
        assert os.path.isfile(run_dir / f"fold_{fold}" / "best.pt")
    summary = read_json(run_dir, "summary.json")
    assert summary["split"] == "test" and summary["cases"] == len(splits[0]["test"])
    assert len(summary["ensemble"]) == 3 and 0 <= summary["regions"]["WT"]["dice"] <= 1
    evaluate.main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "again"), "--no-overlays"])
    assert read_json(tmp_path / "again", "summary.json")["regions"] == summary["regions"]
    with pytest.raises(SystemExit, match="trained or validated on .* of the val-split patients"):
        evaluate.main(["--checkpoint", str(run_dir), "--split", "val", "--out", str(tmp_path / "val")])


def test_independent_runs_evaluate_as_one_ensemble_only_on_cases_all_held_out(tmp_path):
    data = write_patients(tmp_path / "data")
    runs = tmp_path / "runs"
    for name, extra in [("s0", []), ("s1", ["--train.seed", "1"]), ("other", ["--data.split_seed", "5"])]:
        main.main(["--data.dir", data, "--train.out_dir", str(runs), "--train.name", name, *TINY, *extra])
    pair = ["--checkpoint", str(runs / "s0"), "--checkpoint", str(runs / "s1" / "best.pt")]
    evaluate.main([*pair, "--out", str(tmp_path / "ens"), "--no-overlays"])
    summary = read_json(tmp_path / "ens", "summary.json")
    assert summary["cases"] == len(read_json(runs, "s0", "split.json")["test"])
    assert len(summary["ensemble"]) == 2 and len(summary["checkpoint"]) == 2
    assert read_json(runs, "s0", "summary.json")["checkpoint"].endswith("best.pt")  # the run's own report untouched
    with pytest.raises(SystemExit, match="give --out"):
        evaluate.main(pair)
    # another split seed put some of s0's test patients into its training or validation
    other = read_json(runs, "other", "split.json")
    assert {patient_id(c) for c in other["train"] + other["val"]} & {patient_id(c) for c in read_json(runs, "s0", "split.json")["test"]}
    with pytest.raises(SystemExit, match="other/best.pt: its run trained or validated on"):
        evaluate.main(["--checkpoint", str(runs / "s0"), "--checkpoint", str(runs / "other"), "--out", str(tmp_path / "x")])


def test_one_fold_trains_alone_in_a_normal_run_folder(tmp_path):
    data = write_patients(tmp_path / "data", n_patients=7)
    main.main(["--data.dir", data, "--train.out_dir", str(tmp_path / "runs"), "--train.name", "f1",
               "--data.folds", "3", "--data.fold", "1", *TINY])
    split = read_json(tmp_path / "runs" / "f1", "split.json")
    assert split["fold"] == 1 and split["val"] and os.path.isfile(tmp_path / "runs" / "f1" / "best.pt")


def test_folds_without_a_test_split_validate_every_patient_once(tmp_path, capsys):
    """7 patients, data.test_fraction left at its default: no test split (1 < data.min_test_cases), so
    the folds deal all 7 and each fold's validation figures are the estimate; no ensemble is scored."""
    data = write_patients(tmp_path / "data", n_patients=7)
    tiny = TINY[:TINY.index("--data.test_fraction")]
    main.main(["--data.dir", data, "--train.out_dir", str(tmp_path / "runs"), "--train.name", "cv",
               "--data.folds", "2", "--data.fold", "all", *tiny])
    run_dir = tmp_path / "runs" / "cv"
    splits = [read_json(run_dir, f"fold_{i}", "split.json") for i in range(2)]
    assert all(s["test"] == [] and s["held_out"]["test"].startswith("no test split") for s in splits)
    assert {patient_id(c) for s in splits for c in s["val"]} == {f"BraTS-GLI-{p:05d}" for p in range(7)}
    assert all(read_json(run_dir, f"fold_{i}", "summary.json")["split"] == "val" for i in range(2))
    printed = capsys.readouterr().out
    assert not os.path.exists(run_dir / "summary.json") and "no test split: the folds'" in printed
    # postprocessing is chosen once, on every fold's validation cases pooled, and every fold ships it
    pooled = read_json(run_dir, "postprocessing.json")
    assert sorted(c["case"] for c in pooled["per_case"]) == sorted(c for s in splits for c in s["val"])
    assert pooled["cases"] == 10 and "cross-validation, 10 cases" in printed
    for i in range(2):
        assert not os.path.exists(run_dir / f"fold_{i}" / "postprocessing.json")
        assert load_checkpoint(str(run_dir / f"fold_{i}" / "best.pt"))["postprocessing"] == pooled["chosen"]


@pytest.mark.parametrize("pairs, problem", [
    ({"data.folds": "1"}, "data.folds 1: use 0"), ({"data.folds": "3", "data.fold": "3"}, "data.fold '3': choose 0..2"),
    ({"data.folds": "3", "data.fold": "first"}, "data.fold 'first'")])
def test_fold_keys_are_checked(pairs, problem):
    with pytest.raises(ValueError, match=problem):
        check(build_config(pairs))
