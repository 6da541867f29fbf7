"""Checkpoints that cannot be loaded or ensembled are refused in one line by predict.py and
evaluate.py: a cross-validation run with a fold missing its best.pt, a run folder with no
checkpoint, and members whose task or input channels differ (their probabilities could not be
averaged region by region)."""
import os

import numpy as np
import pytest
import torch

import evaluate
import predict
from cases.h5 import write_case
from config import build_config, to_dict
from model import build_model
from runtime.checkpoint import save_checkpoint

TINY = {"data.image_size": "16", "model.base_channels": "2", "model.depth": "2"}


def checkpoint(path, **keys):
    """An untrained model saved with its resolved config, as main.py saves best.pt."""
    cfg = build_config({**TINY, **keys})
    torch.manual_seed(0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(str(path), {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg), "epoch": 0})
    return str(path)


@pytest.fixture
def cases(tmp_path):
    folder = tmp_path / "in"
    image = np.ones((4, 16, 16, 16), np.float32)
    write_case(str(folder / "case_000.h5"), image, np.zeros((16, 16, 16), np.uint8))
    return str(folder)


def refusal(entry, args):
    """The exit message of predict.main / evaluate.main (what the command prints), which must be one line."""
    with pytest.raises(SystemExit) as stop:
        entry.main([str(a) for a in args])
    message = stop.value.code
    assert isinstance(message, str) and len(message.splitlines()) == 1 and "Traceback" not in message, message
    return message


def predict_with(cases, out, *specs):
    return refusal(predict, ["-i", cases, "-o", out, "--no-overlays", *[a for s in specs for a in ("-c", s)]])


def test_a_fold_without_its_best_pt_is_refused(tmp_path, cases):
    run = tmp_path / "cv"
    checkpoint(run / "fold_0" / "best.pt")
    (run / "fold_1").mkdir()                                   # a fold that never finished
    message = predict_with(cases, tmp_path / "out", run)
    assert f"{run / 'fold_1' / 'best.pt'}: checkpoint not found; every fold of {run} needs its best.pt" in message
    assert not (tmp_path / "out").exists()


def test_an_empty_run_folder_is_refused(tmp_path, cases):
    (tmp_path / "empty").mkdir()
    message = predict_with(cases, tmp_path / "out", tmp_path / "empty")
    assert f"{tmp_path / 'empty'}: run folder holds neither best.pt nor fold_<i>/best.pt" in message


@pytest.mark.parametrize("other, described", [
    ({"data.task": "binary", "model.out_channels": "1"}, "data.task 'binary' with 4 channels"),
    ({"data.channels": "3", "model.in_channels": "3"}, "data.task 'brats' with 3 channels"),
])
def test_members_of_another_task_or_channel_count_are_refused(tmp_path, cases, other, described):
    first = checkpoint(tmp_path / "a" / "best.pt")
    second = checkpoint(tmp_path / "b" / "best.pt", **other)
    message = predict_with(cases, tmp_path / "out", first, second)
    assert f"{second}: {described} cannot be ensembled with {first} (data.task 'brats', 4 channels)" in message
    message = refusal(evaluate, ["--checkpoint", first, "--checkpoint", second, "--data.dir", cases,
                                 "--split", "all", "--out", tmp_path / "eval"])
    assert f"{second}: {described} cannot be ensembled with {first}" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()
