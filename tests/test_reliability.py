"""Never lose a run: exact resume after a kill or a stop signal, a damaged last.pt, NaN guards.
Safe loading of checkpoints: test_checkpoint.py."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import Config, build_config, from_dict
from conftest import ROOT, write_blob_dataset
from model import UNet
from runtime.checkpoint import load_checkpoint, load_resumable
from train import new_progress, train_one_epoch
from training.guards import GracefulStop, TrainingStopped
from training.run_folder import resume_config
from training.step import make_run

TINY = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--data.num_workers", "0",
        "--train.batch_size", "2", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2",
        "--train.deterministic", "true", "--train.seed", "3", "--data.rotate_prob", "0.5"]
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def start_main(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric_rows(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        return []
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]


def wait_for_rows(proc, run_dir, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(metric_rows(run_dir)) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"run did not reach {n} epochs (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def final_weights(run_dir):
    return load_checkpoint(os.path.join(run_dir, "last.pt"))["model"]


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    """A tiny dataset and an uninterrupted 4-epoch run on it, the reference for every resume."""
    root = tmp_path_factory.mktemp("resume")
    data = str(root / "data")
    write_blob_dataset(data, n_cases=8, shape=(18, 20, 16))
    proc = start_main("--data.dir", data, "--train.out_dir", root, "--train.name", "reference",
                      "--train.epochs", "4", *TINY)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return data, root, os.path.join(root, "reference")


def assert_same_run(run_dir, reference):
    assert metric_rows(run_dir) == metric_rows(reference)
    mine, theirs = final_weights(run_dir), final_weights(reference)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sigkill_after_an_epoch_then_resume_matches_an_unbroken_run(data_and_reference):
    data, root, reference = data_and_reference
    run_dir = os.path.join(root, "killed")
    proc = start_main("--data.dir", data, "--train.out_dir", root, "--train.name", "killed",
                      "--train.epochs", "4", *TINY)
    wait_for_rows(proc, run_dir, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isfile(os.path.join(run_dir, "summary.json"))  # it really was cut short
    resumed = start_main("--resume", run_dir)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(run_dir, reference)
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))


def test_sigterm_mid_epoch_writes_last_pt_and_resume_continues_exactly(data_and_reference):
    data, root, reference = data_and_reference
    run_dir = os.path.join(root, "stopped")
    proc = start_main("--data.dir", data, "--train.out_dir", root, "--train.name", "stopped",
                      "--train.epochs", "4", *TINY)
    wait_for_rows(proc, run_dir, 1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"python main.py --resume {run_dir}" in out
    state = load_checkpoint(os.path.join(run_dir, "last.pt"))
    # stopped inside epoch 2: last.pt holds epoch 1 complete plus the steps epoch 2 had taken
    # (2 steps an epoch; the stop may land on either, or on the first step after epoch 1's bookkeeping)
    partial = state["partial"]
    assert partial is not None and state["epoch"] == 1 and partial["epoch"] == 2, (state["epoch"], partial)
    assert 1 <= partial["steps"] <= 2 and partial["count"] >= 1 and partial["loss_sum"] > 0, partial
    assert len(state["history"]) == 1
    resumed = start_main("--resume", run_dir)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert_same_run(run_dir, reference)


def test_resume_refuses_a_result_changing_config_and_allows_more_epochs(data_and_reference, tmp_path):
    data, root, reference = data_and_reference
    import main
    with pytest.raises(SystemExit) as stop:
        main.main(["--resume", reference, "--model.base_channels", "8", "--train.lr", "0.1"])
    assert "model.base_channels" in str(stop.value.code) and "train.lr" in str(stop.value.code)
    path, state = load_resumable(reference)
    cfg = resume_config(build_config({"train.epochs": "9"}, base=from_dict(state["config"])), state, path)
    assert cfg.train.epochs == 9


def test_a_damaged_last_pt_falls_back_to_the_previous_one(data_and_reference):
    _, _, reference = data_and_reference
    assert os.path.isfile(os.path.join(reference, "last.prev.pt"))
    damaged = os.path.join(reference, "last.pt")
    good = open(damaged, "rb").read()
    try:
        open(damaged, "wb").write(good[:100])
        path, state = load_resumable(reference)
        assert path.endswith("last.prev.pt") and state["epoch"] == 3
    finally:
        open(damaged, "wb").write(good)


def tiny_training(loss_fn, limit=3, steps=4):
    model = UNet(in_channels=1, out_channels=1, base_channels=2, depth=1)
    batches = [{"image": torch.randn(1, 1, 8, 8, 8), "target": torch.zeros(1, 1, 8, 8, 8)}] * steps
    cfg = Config()
    cfg.train.max_bad_steps, cfg.train.grad_clip, cfg.train.amp = limit, 1.0, False
    run = make_run(cfg, model, loss_fn, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    progress = new_progress()
    with GracefulStop() as stop:
        train_one_epoch(run, batches, stop, progress, "test")
    return model, before, progress


def test_nan_steps_are_skipped_without_touching_the_weights():
    calls = []

    def sometimes_nan(logits, target):
        calls.append(1)
        loss = logits.mean() * 0 + 1.0
        return loss * float("nan") if len(calls) % 2 else loss

    model, before, progress = tiny_training(sometimes_nan, limit=3, steps=4)
    assert progress["steps"] == 4 and progress["count"] == 2  # two good steps counted, two skipped
    model, before, progress = tiny_training(lambda logits, target: logits.mean() * float("nan"), limit=10)
    assert progress["count"] == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_too_many_bad_steps_in_a_row_stop_training():
    with pytest.raises(TrainingStopped, match="3 consecutive steps"):
        tiny_training(lambda logits, target: logits.mean() * float("inf"), limit=3, steps=5)
