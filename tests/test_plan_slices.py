"""The 2D (slices) plan: slice size, width, depth, batch, context and learning rate chosen from a
speed table and the budget, explicit keys kept, plan.json explaining each choice, and the timing of
training's own step at the planned context."""
import json
import math

import numpy as np
import pytest
import torch

from cases.h5 import case_format, write_case
from config import PLANNER, Config, apply_dict
from planning import fingerprint, plan, planner, report, slices
from planning.speed import measure_speed

BUDGETS = [0.5 * 1.25 ** i for i in range(40)]  # 0.5 min to ~2 days

LGG = {"n_cases": 37, "median_shape": [36.0, 256.0, 256.0], "median_spacing": [1.0, 1.0, 1.0],
       "intensity": [{}] * 3}
SLICES = {"data.mode": "slices", "model.dims": 2, "data.channels": 3}


def slice_speed(step_128=0.17, exponent=1.7, widths=(16, 32), device="cpu"):
    """A 2D speed table as planner.measure_slices returns it: a step of 16 slices of 128x128 at
    width 16 takes step_128 s, and seconds scale with pixels x width**exponent."""
    points = [{"base_channels": width, "size": [128, 128], "voxels": 16 * 128 * 128,
               "step_seconds": step_128 * (width / 16) ** exponent,
               "forward_seconds": step_128 / 6 * (width / 16) ** exponent} for width in widths]
    return {"device": device, "batch_size": 16, "depth": 4, "base_channels": widths[0], "points": points}


def plan_2d(budget, speed, explicit=None):
    return plan.plan_recipe(LGG, budget, speed, {**SLICES, **(explicit or {})}, val_cases=6)


def test_2d_half_an_hour_on_2_cpu_cores_plans_the_cpu_recipe_and_a_fast_device_the_native_size_and_width_32():
    # the CPU table is this project's 2-core timing of 128x128 width 16 (0.17 s a step with its data)
    values = plan_2d(30, slice_speed())["values"]
    assert (values["data.image_size"], values["model.base_channels"], values["model.depth"]) == ([128, 128], 16, 4)
    assert (values["train.batch_size"], values["data.slice_context"], values["model.in_channels"]) == (16, 1, 9)
    assert values["train.lr"] == 1e-3 and values["train.schedule"] == "poly" and values["train.epochs"] == 0
    target = math.ceil(PLANNER.slice_target_epochs * 37 * 36 / 16)  # passes over 37 cases of 36 slices
    assert plan_2d(30, slice_speed())["estimates"]["target_steps"] == target <= values["train.max_steps"]
    for speed in (slice_speed(step_128=0.002, exponent=0.5, device="cuda"), slice_speed()):
        budget = 30 if speed["device"] == "cuda" else 3000  # a GPU's half hour, or two days on the CPU
        values = plan_2d(budget, speed)["values"]
        assert (values["data.image_size"], values["model.base_channels"]) == ([256, 256], 32)
    slow = plan_2d(30, slice_speed(step_128=2.0))  # a busy machine: nothing buys the target, the cheapest
    assert (slow["values"]["data.image_size"], slow["values"]["model.base_channels"]) == ([128, 128], 16)
    assert slow["values"]["train.max_steps"] < target and "the cheapest" in slow["why"]["data.image_size"]
    sampled = plan_2d(30, slice_speed(), {"data.slices_per_case": 8})  # shorter epochs: a larger network
    assert sampled["estimates"]["target_steps"] == math.ceil(PLANNER.slice_target_epochs * 37 * 8 / 16)
    assert sampled["estimates"]["chosen"]["step_seconds"] > plan_2d(30, slice_speed())["estimates"]["chosen"][
        "step_seconds"]


def test_2d_a_larger_budget_never_gives_a_cheaper_recipe_and_sizes_stay_between_half_and_native():
    for speed in (slice_speed(), slice_speed(step_128=0.01, exponent=1.0, device="cuda")):
        costs, recipes = [], set()
        for budget in BUDGETS:
            p = plan_2d(budget, speed)
            chosen, values = p["estimates"]["chosen"], p["values"]
            costs.append(chosen["step_seconds"])
            recipes.add((tuple(values["data.image_size"]), values["model.base_channels"]))
            assert all(s % 2 ** values["model.depth"] == 0 and 128 <= s <= 256 for s in values["data.image_size"])
        assert costs == sorted(costs), speed["device"]
        assert len(recipes) >= 3  # the budget moves the recipe through the candidates


def test_2d_speed_model_fits_the_width_exponent_from_two_timed_widths():
    fit = slices.fit_slice_speed(slice_speed(exponent=1.7))
    assert fit["step"][1] == pytest.approx(1.7) and fit["forward"][1] == pytest.approx(1.7)
    assert fit["check"]["width"] == 32 and fit["check"]["measured"] < fit["check"]["width_squared_predicts"]
    one = slices.fit_slice_speed(slice_speed(widths=(16,)))
    assert one["step"][1] == PLANNER.slice_width_exponent and one["check"] is None
    p = plan_2d(30, slice_speed(exponent=1.7))
    assert "width^1.70" in p["why"]["speed"] and "width^2 would predict" in p["why"]["speed"]
    modelled = {(tuple(c["size"]), c["base_channels"]): c["step_seconds"] for c in p["estimates"]["weighed"]}
    assert modelled[((256, 256), 32)] == pytest.approx(0.17 * 4 * 2 ** 1.7)  # 4x the pixels, 2x the width


def test_2d_timing_points_are_the_smallest_size_at_the_narrowest_and_the_widest_width():
    assert slices.timing_points(LGG, SLICES) == [([128, 128], 4, 16), ([128, 128], 4, 32)]
    assert slices.timing_points(LGG, {**SLICES, "model.base_channels": 24}) == [([128, 128], 4, 24)]
    assert slices.timing_points(LGG, {**SLICES, "data.image_size": [3, 200, 200], "model.depth": 3}) == \
        [([200, 200], 3, 16), ([200, 200], 3, 32)]


def test_2d_the_wider_timing_is_predicted_from_the_narrower_one():
    last = {"base_channels": 16, "step_seconds": 0.5, "forward_seconds": 0.1, "seconds": 4.0}  # 0.7 s of reads
    assert planner.predicted_timing(last, 32, steps=4) == pytest.approx(0.7 + 4 * 3.3)


def test_2d_explicit_keys_win_and_the_rest_is_planned_around_them():
    explicit = {"data.image_size": [192, 192], "model.base_channels": 24, "train.lr": 3e-4, "train.batch_size": 8,
                "data.slice_context": 0, "model.depth": 3, "train.max_steps": 500}
    p = plan_2d(30, slice_speed(), explicit)
    values = p["values"]
    for key, value in explicit.items():
        assert values[key] == value and p["why"][key] == "set explicitly", key
    assert values["model.in_channels"] == 3 and values["train.warmup_steps"] == round(PLANNER.warmup_share * 500)
    assert p["estimates"]["chosen"]["batch_size"] == 8 and len(p["estimates"]["weighed"]) == 1
    derived = plan_2d(30, slice_speed(), {"model.in_channels": 3})  # one slice: no neighbours
    assert (derived["values"]["data.slice_context"], derived["values"]["model.in_channels"]) == (0, 3)
    assert derived["why"]["data.slice_context"].startswith("implied by the explicit model.in_channels")
    flat = plan.plan_recipe({**LGG, "median_shape": [2.0, 256.0, 256.0]}, 30, slice_speed(), SLICES, val_cases=6)
    assert (flat["values"]["data.slice_context"], flat["values"]["model.in_channels"]) == (0, 3)  # no neighbours
    wide = plan_2d(30, slice_speed(), {"model.base_channels": 32})["values"]
    assert wide["model.base_channels"] == 32 and wide["data.image_size"] == [128, 128]
    capped = plan_2d(30, slice_speed(), {"train.epochs": 50})  # an epoch limit the user typed
    assert capped["values"]["train.epochs"] == 50 and "stops after 50 epochs" in capped["why"]["train.epochs"]


def test_2d_plan_explains_each_choice_and_records_its_figures(tmp_path):
    p = plan_2d(30, slice_speed())
    assert set(p["why"]) >= set(p["values"]) and all(p["why"][key] for key in p["values"])
    assert f"{p['estimates']['chosen']['steps']} steps" in p["why"]["data.image_size"]
    assert "256x256" in p["why"]["data.image_size"] and "the next costlier" in p["why"]["model.base_channels"]
    assert p["constants"]["SLICE_TARGET_EPOCHS"] == PLANNER.slice_target_epochs
    target = f"{p['estimates']['target_steps']} steps ({PLANNER.slice_target_epochs} passes"
    assert target in p["why"]["data.image_size"]
    assert p["steps"] == {"planned": p["values"]["train.max_steps"], "made": None}
    text = report.format_plan(p)
    assert all(key in text for key in p["values"]) and "width^" in text
    report.write_plan(str(tmp_path), p)
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(json.dumps(p))


def test_2d_measure_slices_times_training_step_at_the_timing_points_with_the_planned_context(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        image = rng.uniform(1, 100, (3, 5, 32, 32)).astype(np.float32)
        mask = np.zeros((5, 32, 32), np.uint8)
        mask[1:4, 10:20, 12:22] = 1
        paths.append(write_case(str(tmp_path / f"p{i}.h5"), image, mask))
    cfg = Config()
    apply_dict(cfg, {**SLICES, "data.task": "binary", "model.in_channels": 3, "model.out_channels": 1,
                     "model.norm": "batch", "data.num_workers": 0, "data.image_size": [32, 32]})
    seen = []

    def recorded(timed_cfg, cases, device, sizes, **kwargs):
        seen.append((timed_cfg.model.base_channels, timed_cfg.model.in_channels, list(timed_cfg.data.image_size),
                     len(cases)))
        return measure_speed(timed_cfg, cases, device, sizes, steps=1, **kwargs)

    monkeypatch.setattr(planner, "measure_speed", recorded)
    fp = fingerprint.fingerprint(paths, case_format(cfg.data), "binary")
    table = planner.measure_slices(cfg, {**SLICES, "train.batch_size": 4}, fp, paths, torch.device("cpu"))
    assert seen[0] == (16, 9, [16, 16], PLANNER.slice_speed_cases)  # the smallest size, 2.5D, a few cases
    assert seen[1:] in ([], [(32, 9, [16, 16], PLANNER.slice_speed_cases)])  # the widest, unless too slow
    assert [p["base_channels"] for p in table["points"]] in ([16], [16, 32]) and table["slice_context"] == 1
    assert table["batch_size"] == 4 and all(p["step_seconds"] > 0 for p in table["points"])
    values = plan.plan_recipe(fp, 1, table, {**SLICES, "train.batch_size": 4}, val_cases=1)["values"]
    assert values["data.image_size"] in ([32, 32], [24, 24], [16, 16]) and values["train.max_steps"] >= 1
