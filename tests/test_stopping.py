"""What ends a run or changes its course: early stopping and its patience, the plateau scheduler's
cuts of the learning rate, the train.max_minutes stop, and the fp16 loss scaler.

The runs use train.lr 0 (or 1e-6) so that validation never improves: the network does not change,
every validation scores the same, and the expected rounds follow from the rules by hand.
"""
import csv
import logging

import pytest
import torch

import main
from config import Config
from conftest import write_blob_dataset
from losses import DiceBCELoss
from model import UNet
from runtime.checkpoint import load_checkpoint
from training.guards import EarlyStopping
from training.step import make_run, train_step

TINY = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--data.num_workers", "0",
        "--train.batch_size", "2", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2"]


def run_main(tmp_path, *args):
    """main.py on six blob cases (four train: two steps an epoch); returns (run folder, metrics rows)."""
    write_blob_dataset(str(tmp_path / "data"))
    main.main(["--data.dir", str(tmp_path / "data"), "--train.out_dir", str(tmp_path), "--train.name", "r",
               *TINY, *args])
    run_dir = tmp_path / "r"
    return run_dir, list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_early_stopping_counts_rounds_without_a_strictly_better_score():
    stopper = EarlyStopping(patience=2)
    seen = [(stopper.update(score), stopper.bad_epochs, stopper.should_stop)
            for score in (0.5, 0.6, 0.6, 0.55, 0.7, 0.1, 0.1)]
    assert seen == [(True, 0, False), (True, 0, False), (False, 1, False), (False, 2, True),
                    (True, 0, False), (False, 1, False), (False, 2, True)]
    assert stopper.state_dict() == {"patience": 2, "best": 0.7, "bad_epochs": 2}
    never = EarlyStopping(patience=0)  # patience 0 turns early stopping off
    for _ in range(50):
        never.update(0.0)
    assert never.bad_epochs == 49 and not never.should_stop


def test_training_stops_after_patience_rounds_without_improvement(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_dir, rows = run_main(tmp_path, "--train.lr", "0", "--train.epochs", "10", "--train.patience", "2")
    # round 1 sets the best; rounds 2 and 3 score the same, not better: patience 2 is spent after round 3
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert len({r["val_dice_wt"] for r in rows}) == 1
    assert any("early stopping" in r.getMessage() for r in caplog.records)
    state = load_checkpoint(str(run_dir / "last.pt"))
    assert state["early_stopping"]["bad_epochs"] == 2 and state["epoch"] == 3
    assert load_checkpoint(str(run_dir / "best.pt"))["epoch"] == 1


@pytest.mark.parametrize("ship, shipped_epoch", [("auto", 3), ("final", 3), ("best", 1)])
def test_a_poly_run_ships_its_final_weights_unless_asked_for_the_best_round(tmp_path, ship, shipped_epoch):
    # lr 0: every round validates the same, so only round 1 ever "improves"; poly ends the lr with the run
    run_dir, rows = run_main(tmp_path, "--train.lr", "0", "--train.schedule", "poly", "--train.max_steps", "6",
                             "--train.epochs", "0", "--train.patience", "0", "--train.ship", ship)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert load_checkpoint(str(run_dir / "best.pt"))["epoch"] == shipped_epoch


def test_plateau_scheduler_cuts_the_learning_rate_when_validation_loss_stalls(tmp_path):
    run_dir, rows = run_main(tmp_path, "--train.lr", "1e-6", "--train.epochs", "4", "--train.patience", "0",
                             "--train.lr_patience", "0", "--train.lr_factor", "0.5")
    losses = [float(r["val_loss"]) for r in rows]
    # lr 1e-6 barely moves the weights: no round beats the first by ReduceLROnPlateau's 1e-4 (relative)
    assert all(loss > losses[0] * (1 - 1e-4) for loss in losses[1:]), losses
    # lr_patience 0: every round after the first without improvement halves the rate
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-6, 5e-7, 2.5e-7, 1.25e-7], rel=1e-9)
    state = load_checkpoint(str(run_dir / "last.pt"))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.25e-7, rel=1e-9)


def test_max_minutes_ends_training_after_the_step_that_runs_out_of_time(tmp_path):
    # 1e-5 minutes (0.6 ms) are gone before the first step ends; 50 epochs would be 100 steps
    _, rows = run_main(tmp_path, "--train.max_minutes", "1e-5", "--train.plan", "off", "--train.epochs", "50")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1")]  # one step, then one last validation


def fp16_run():
    cfg = Config()
    cfg.train.precision = "fp16"
    torch.manual_seed(0)
    model = UNet(in_channels=4, out_channels=3, base_channels=2, depth=1)
    return make_run(cfg, model, DiceBCELoss(), torch.device("cpu")), model


def test_fp16_steps_go_through_the_loss_scaler_which_skips_overflowing_steps():
    run, model = fp16_run()
    assert run.amp_dtype == torch.float16 and run.scaler.is_enabled()
    batch = {"image": torch.randn(2, 4, 8, 8, 8), "target": (torch.rand(2, 3, 8, 8, 8) > 0.7).float()}
    before = [p.detach().clone() for p in model.parameters()]
    assert train_step(run, batch) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert run.scaler.get_scale() == 2.0 ** 16  # the default start; it grows only after 2000 good steps
    run.scaler.update(2.0 ** 100)  # a scale at which the fp16 gradients overflow
    before = [p.detach().clone() for p in model.parameters()]
    train_step(run, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped...
    assert run.scaler.get_scale() == 2.0 ** 99                                # ...and the scale halved
    assert run.optimizer.state_dict()["state"][0]["step"] == 1 and run.step == 2


def test_an_fp16_run_saves_its_scaler_state(tmp_path):
    run_dir, rows = run_main(tmp_path, "--train.precision", "fp16", "--train.epochs", "1")
    assert len(rows) == 1
    scaler = load_checkpoint(str(run_dir / "last.pt"))["scaler"]
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 2  # two good steps counted
