"""A 2-epoch training run writes every output; evaluate.py scores its checkpoint end to end."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from config import build_config
from conftest import ROOT
from evaluate import evaluate_checkpoint
from main import train_and_evaluate

TINY = {"data.image_size": "16", "model.base_channels": "4", "model.depth": "2", "train.epochs": "2",
        "data.num_workers": "0", "train.batch_size": "2", "data.val_fraction": "0.2", "data.test_fraction": "0.2"}


def test_two_epoch_run_writes_every_output(tiny_dataset, tmp_path):
    cfg = build_config({**TINY, "data.dir": tiny_dataset, "train.out_dir": str(tmp_path / "runs"),
                        "train.name": "smoke"})
    run_dir = train_and_evaluate(cfg)
    for name in ("config.json", "split.json", "last.pt", "best.pt", "metrics.csv", "curves.png",
                 "summary.json", "per_case.csv", "postprocessing.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    chosen = json.load(open(os.path.join(run_dir, "postprocessing.json")))["chosen"]
    assert torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)["postprocessing"] == chosen
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_dice_wt", "val_dice_tc", "val_dice_et", "lr", "seconds"}
    split = json.load(open(os.path.join(run_dir, "split.json")))
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["data"]["image_size"] == [16, 16, 16] and saved["train"]["epochs"] == 2
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["split"] == "test" and summary["cases"] == len(split["test"])
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]
    # evaluate.py's split defaults to eval.split; a bad value is refused by config.check
    best = os.path.join(run_dir, "best.pt")
    val = evaluate_checkpoint(best, out_dir=str(tmp_path / "val"), overrides={"eval.split": "val"})
    assert val["split"] == "val" and val["cases"] == len(split["val"])
    with pytest.raises(ValueError, match="eval.split 'train'"):
        evaluate_checkpoint(best, out_dir=str(tmp_path / "bad"), overrides={"eval.split": "train"})


def test_evaluate_cli_scores_every_case(tiny_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = [f"--{k}={v}" for k, v in TINY.items()]
    out = tmp_path / "runs"
    subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--data.dir", tiny_dataset,
                    "--train.out_dir", str(out), "--train.name", "r", *args], check=True, env=env, cwd=tmp_path)
    eval_dir = tmp_path / "eval"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint",
                             str(out / "r" / "best.pt"), "--data.dir", tiny_dataset, "--split", "all",
                             "--out", str(eval_dir)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.load(open(eval_dir / "summary.json"))
    assert summary["split"] == "all" and summary["cases"] == 6
    for region in ("WT", "TC", "ET"):
        for metric in ("dice", "iou", "sensitivity", "specificity", "hd95"):
            assert 0 <= summary["regions"][region][metric] <= 373.13
    rows = list(csv.DictReader(open(eval_dir / "per_case.csv")))
    assert len(rows) == 6 and "WT_dice" in rows[0] and "ET_hd95" in rows[0]
    assert "WT" in result.stdout


def test_bad_key_and_bad_data_exit_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad_key = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--train.lrr", "1"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad_key.returncode != 0 and "--train.lr" in bad_key.stderr and "Traceback" not in bad_key.stderr
    (tmp_path / "empty").mkdir()
    empty = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--data.dir", str(tmp_path / "empty")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert empty.returncode != 0 and "no .h5 case files" in empty.stderr and "Traceback" not in empty.stderr


def test_a_small_set_trains_on_every_case_outside_validation_and_reports_validation(tiny_dataset, tmp_path, capsys):
    """6 cases and data.test_fraction left at its default: 15% would test on 1 case (< data.min_test_cases),
    so none is held out for test; the validation figures are printed and evaluate.py's default split
    says what to do instead of failing."""
    import evaluate
    import main
    tiny = {k: v for k, v in TINY.items() if k not in ("data.test_fraction", "data.val_fraction")}
    main.main(["--data.dir", tiny_dataset, "--train.out_dir", str(tmp_path), "--train.name", "all",
               *[f"--{k}={v}" for k, v in tiny.items()]])
    run_dir = tmp_path / "all"
    split = json.load(open(run_dir / "split.json"))
    assert split["test"] == [] and len(split["val"]) == 1 and len(split["train"]) == 5
    assert split["held_out"]["test"].startswith("no test split: 6 cases, a 15% test split would hold 1 "
                                                "(< data.min_test_cases 10)")
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["split"] == "val" and summary["cases"] == 1
    printed = capsys.readouterr().out
    assert "val split, 1 cases" in printed and "slightly optimistic" in printed
    with pytest.raises(SystemExit, match="no test cases in this run's split .*no test split.*use --split val"):
        evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--no-overlays"])


@pytest.mark.parametrize("explicit, test_fraction, asked", [
    ({"data.test_fraction": 0.15}, 0.15, True), ({"train.lr": 0.1}, 0.15, False),
    (None, 0.15, False), (None, 0.2, True)])
def test_a_test_split_is_asked_for_by_setting_test_fraction(explicit, test_fraction, asked):
    import main
    cfg = build_config({"data.test_fraction": str(test_fraction)})
    assert main.asked_for_test(cfg, explicit) is asked
