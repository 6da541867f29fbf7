"""The training loop's parts: one step (step.train_step), validation through evaluation's per-case
path (train.validate), and a run without validation cases."""
import csv
import logging
import os
import shutil
import time
import warnings

import numpy as np
import pytest
import torch

from cases.cache import CaseCache
from cases.h5 import write_case
from config import Config, build_config
from conftest import SHAPE, TumourDetector, bright_case
from evaluate import evaluate_cases
from losses import DiceBCELoss
from main import train_and_evaluate
from model import UNet
from runtime.checkpoint import load_checkpoint
from train import refit_steps, validate
from training.step import make_run, scheduled_lr, train_step

CPU = torch.device("cpu")


def tiny_run(model, **train_keys):
    cfg = Config()
    cfg.train.amp = False
    for key, value in train_keys.items():
        setattr(cfg.train, key, value)
    return make_run(cfg, model, DiceBCELoss(), CPU)


def grad_norm(model):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_a_step_updates_the_weights_with_clipped_gradients(grad_clip):
    torch.manual_seed(0)
    model = UNet(in_channels=4, out_channels=3, base_channels=2, depth=1)
    run = tiny_run(model, grad_clip=grad_clip)
    batch = {"image": torch.randn(2, 4, 8, 8, 8), "target": (torch.rand(2, 3, 8, 8, 8) > 0.7).float()}
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(run, batch)
    assert isinstance(loss, float) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the gradients the optimizer stepped on are still there: clipped to grad_clip when it is set
    if grad_clip:
        assert grad_norm(model) <= grad_clip * 1.001
    else:
        assert grad_norm(model) > 1e-2


@pytest.fixture
def bright_cases(tmp_path):
    """Three files of the case TumourDetector answers perfectly."""
    paths = []
    for i in range(3):
        case = bright_case(f"b{i}")
        paths.append(write_case(str(tmp_path / f"b{i}.h5"), case.image, case.mask))
    return paths


def validation_run(**eval_keys):
    run = tiny_run(TumourDetector())
    run.cfg.data.image_size = SHAPE  # the native grid: resize is the identity
    for key, value in eval_keys.items():
        setattr(run.cfg.eval, key, value)
    return run


def test_validation_scores_whole_cases_as_evaluation_does(bright_cases):
    run = validation_run()
    val_loss, dice = validate(run, bright_cases, CaseCache(None, 2 ** 30))
    assert dice == {"WT": 1.0, "TC": 1.0, "ET": 1.0} and 0 < val_loss < 0.05
    evaluated = evaluate_cases(run.model, bright_cases, run.cfg, CPU)
    assert [scores["ET"]["dice"] for _, scores, _ in evaluated] == [1.0] * 3
    assert validate(run, [], CaseCache(None, 0)) is None


def test_validation_honours_the_eval_keys(bright_cases, tmp_path):
    run = validation_run(threshold=1.0)  # nothing reaches the threshold: every case scores Dice 0
    assert validate(run, bright_cases, CaseCache(None, 0))[1] == {"WT": 0.0, "TC": 0.0, "ET": 0.0}
    stray = bright_case("stray", stray=True)  # a false-positive voxel that only postprocessing removes
    path = write_case(str(tmp_path / "stray.h5"), stray.image, stray.mask)
    assert validate(validation_run(), [path], CaseCache(None, 0))[1]["WT"] < 1.0
    assert validate(validation_run(largest_component=True), [path], CaseCache(None, 0))[1]["WT"] == 1.0


def test_validation_cases_are_read_once_within_the_cache_budget(bright_cases):
    cache = CaseCache(None, 2 ** 30)
    for _ in range(2):
        validate(validation_run(), bright_cases, cache)
    assert set(cache.cases) == set(bright_cases)
    nothing = CaseCache(None, 0)
    validate(validation_run(), bright_cases, nothing)
    assert not nothing.cases


def test_without_validation_cases_best_pt_follows_the_training_loss(tiny_dataset, tmp_path, caplog):
    cfg = build_config({"data.dir": tiny_dataset, "data.val_fraction": "0", "data.test_fraction": "0.2",
                        "data.image_size": "16", "model.base_channels": "4", "model.depth": "2",
                        "train.epochs": "2", "train.batch_size": "2", "data.num_workers": "0",
                        "train.out_dir": str(tmp_path), "train.name": "noval"})
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error", RuntimeWarning)  # no "mean of empty slice"
        run_dir = train_and_evaluate(cfg)
    assert sum("no validation cases" in r.getMessage() for r in caplog.records) == 1
    # no train.max_minutes: nothing planned, today's recipe (ReduceLROnPlateau, early stopping)
    assert not os.path.exists(os.path.join(run_dir, "plan.json"))
    saved = load_checkpoint(os.path.join(run_dir, "last.pt"))
    assert saved["config"]["train"]["schedule"] == "plateau" and saved["scheduler"] is not None
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert len(rows) == 2 and not [k for k in rows[0] if k.startswith("val_")]
    best = load_checkpoint(os.path.join(run_dir, "best.pt"))
    losses = [float(r["train_loss"]) for r in rows]
    assert best["epoch"] == 1 + int(np.argmin(losses))
    assert -best["best_score"] == pytest.approx(min(losses), abs=1e-4)


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_a_schedule_by_step_warms_up_then_decays_to_about_0_at_max_steps(schedule):
    model = UNet(in_channels=4, out_channels=3, base_channels=2, depth=1)
    run = tiny_run(model, schedule=schedule, max_steps=12, warmup_steps=2, lr=0.01)
    assert run.scheduler is None and not run.stopper.should_stop  # no plateau, no early stopping
    batch = {"image": torch.randn(1, 4, 8, 8, 8), "target": torch.zeros(1, 3, 8, 8, 8)}
    lrs = []
    for _ in range(12):
        train_step(run, batch)
        lrs.append(run.optimizer.param_groups[0]["lr"])
    assert run.step == 12 and lrs[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])  # warm-up, then the top
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # decays every step after it
    assert lrs[-1] < 0.01 * 0.15 and scheduled_lr(0.01, 12, run.cfg.train) == pytest.approx(0, abs=1e-12)


def tiny_cli(data, out, name, *extra):
    return ["--data.dir", data, "--train.out_dir", str(out), "--train.name", name, "--data.image_size", "16",
            "--model.base_channels", "4", "--model.depth", "2", "--data.num_workers", "0", "--train.batch_size", "1",
            "--data.val_fraction", "0.2", "--data.test_fraction", "0.2", "--train.deterministic", "true", *extra]


def rows(run_dir):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(
        os.path.join(run_dir, "metrics.csv")))]


def test_validation_every_n_steps_and_an_exact_resume_mid_schedule(tiny_dataset, tmp_path):
    import main
    # 4 training cases, batch 1: 4 steps an epoch; validation at steps 3 and 6 (inside epochs) and 8 (the end)
    schedule = ["--train.schedule", "poly", "--train.max_steps", "8", "--train.warmup_steps", "2",
                "--train.val_every", "3", "--train.epochs", "0"]
    main.main(tiny_cli(tiny_dataset, tmp_path, "ref", *schedule))
    reference = str(tmp_path / "ref")
    assert [(r["epoch"], r["step"]) for r in rows(reference)] == [("1", "3"), ("2", "6"), ("3", "8")]
    assert float(rows(reference)[-1]["lr"]) < 1e-3 * 0.2  # poly near its end
    # last.prev.pt is the state after the validation at step 6, in the middle of epoch 2: resume from it
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("split.json", "config.json", "best.pt"):
        shutil.copy(os.path.join(reference, name), resumed / name)
    shutil.copy(os.path.join(reference, "last.prev.pt"), resumed / "last.pt")
    state = load_checkpoint(str(resumed / "last.pt"))
    assert state["step"] == 6 and state["epoch"] == 1 and state["partial"]["steps"] == 2
    main.main(["--resume", str(resumed)])
    assert rows(str(resumed)) == rows(reference)
    mine, theirs = (load_checkpoint(os.path.join(d, "last.pt"))["model"] for d in (str(resumed), reference))
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_refit_steps_fits_a_planned_step_count_to_the_pace_of_each_round():
    model = UNet(4, 3, base_channels=2, depth=1)
    run = tiny_run(model, schedule="poly", max_steps=100, warmup_steps=2, lr=0.01)
    run.cfg.train.max_minutes, run.cfg.train.val_every = 1.0, 10  # 10 validation rounds planned
    run.started, run.step = time.time() - 6.0, 10                 # the first round: 10 steps in 5 s
    refit_steps(run, 10, train_seconds=5.0, val_seconds=0.1)
    # 60 s budget - 6 s spent - 9 validations left x 0.1 s = 53.1 s of steps at 0.5 s: 106 more
    assert run.cfg.train.max_steps == pytest.approx(116, abs=1)
    assert run.cfg.train.val_every == 12                          # the 9 rounds left keep their number
    refit_steps(run, 10, train_seconds=1.0, val_seconds=0.1)      # steps 5x faster: 5x the steps left
    assert run.cfg.train.max_steps == pytest.approx(10 + 531, abs=3)
    run.started, run.step = time.time() - 30.0, 240               # later the pace slows: fewer steps left
    rounds = -(-(run.cfg.train.max_steps - 240) // run.cfg.train.val_every)
    refit_steps(run, 50, train_seconds=10.0, val_seconds=0.1)     # 30 s left at 0.2 s a step
    assert run.cfg.train.max_steps == pytest.approx(240 + int((30 - rounds * 0.1) / 0.2), abs=2)
    refit_steps(run, 50, train_seconds=10.0, val_seconds=5.0)     # validation would eat the rest: 1 round left
    assert run.cfg.train.max_steps == pytest.approx(240 + 125, abs=2)
    assert run.cfg.train.val_every == run.cfg.train.max_steps - 240
    run.step = run.cfg.train.max_steps                            # the final round: nothing left to fit
    refit_steps(run, 50, train_seconds=10.0, val_seconds=5.0)
    assert run.cfg.train.max_steps == run.step


def test_a_refitted_val_every_counts_from_the_last_validation(monkeypatch):
    import train
    from training.guards import GracefulStop
    run = tiny_run(UNet(4, 3, base_channels=2, depth=1), val_every=7, epochs=0)
    run.step = 10  # validated at step 10 under val_every 10; refit_steps has just made it 7
    batch = {"image": torch.randn(1, 4, 8, 8, 8), "target": torch.zeros(1, 3, 8, 8, 8)}
    monkeypatch.setattr(train, "epoch_loader", lambda *args: [batch] * 5)  # epochs of 5 steps
    with GracefulStop() as stop:
        assert train.train_round(run, None, train.new_progress(), stop) == "validate"
    assert run.step == 17  # 7 steps after the last validation, not at 14, the next multiple of 7
