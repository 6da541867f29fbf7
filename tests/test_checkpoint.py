"""Checkpoints: plain containers only, a malicious pickle refused without running, and a run's
state (train.checkpoint_state) restored exactly into fresh training objects (train.restore_state)."""
import os
import subprocess
import sys

import pytest
import torch

from config import Config
from conftest import ROOT
from losses import DiceBCELoss
from model import UNet
from runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from train import checkpoint_state, restore_state
from training.step import make_run, train_step

ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "early_stopping", "epoch", "best_score", "config",
                   "history", "rng", "partial", "step"}


class Payload:
    """Pickles into a call that would create a file if a loader ever ran it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "evil": Payload(str(marker))}, str(path))
    with pytest.raises(CheckpointError, match="evil.pt: not a loadable checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(path),
                             "--split", "all"], capture_output=True, text=True, env=ENV)
    assert result.returncode != 0 and "evil.pt" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_checkpoints_hold_only_plain_containers(tmp_path):
    state = {"model": UNet(base_channels=4, depth=2).state_dict(), "config": {"a": [1, 2]}, "rng": (3, (1, 2))}
    save_checkpoint(str(tmp_path / "ok.pt"), state)
    assert load_checkpoint(str(tmp_path / "ok.pt"))["config"] == {"a": [1, 2]}




def tiny_run(seed):
    torch.manual_seed(seed)
    cfg = Config()
    cfg.train.amp = False
    return make_run(cfg, UNet(in_channels=4, out_channels=3, base_channels=2, depth=1), DiceBCELoss(),
                    torch.device("cpu"))


def test_a_run_state_round_trips_through_a_checkpoint_file(tmp_path):
    run = tiny_run(0)
    batch = {"image": torch.randn(1, 4, 8, 8, 8), "target": torch.zeros(1, 3, 8, 8, 8)}
    train_step(run, batch)
    run.scheduler.step(0.5)
    run.stopper.update(0.7)
    partial = {"steps": 3, "loss_sum": 1.5, "count": 3, "epoch": 2}
    save_checkpoint(str(tmp_path / "last.pt"), checkpoint_state(run, [{"epoch": 1}], partial))
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert set(state) == CHECKPOINT_KEYS and state["best_score"] == 0.7  # older keys, plus the step count
    assert state["epoch"] == 1 and state["step"] == 1
    fresh = tiny_run(1)
    history, position = restore_state(fresh, state)
    assert (history, position, fresh.step) == ([{"epoch": 1}], partial, 1)
    for name, value in run.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], value), name
    assert fresh.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()
    assert (fresh.stopper.best, fresh.stopper.bad_epochs) == (0.7, 0)
    # the restored run takes the same next step as the original
    torch.testing.assert_close(train_step(fresh, batch), train_step(run, batch))
