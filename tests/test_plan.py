"""The planner: fingerprint of real files, the pure plan rule on synthetic fingerprints and speed
tables, and a tiny speed measurement (its shape, never its timing)."""
import json
import math
import os

import numpy as np
import pytest

from cases.h5 import CaseFormat, write_case
from config import ModelConfig
from conftest import blob_case
from planning import fingerprint, plan, report
from planning.speed import fit_line, measure_speed
from transforms.regions import REGIONS, labels_to_regions
from transforms.resample import resampled_shape

BUDGETS = [0.5 * 1.25 ** i for i in range(40)]  # 0.5 min to ~2 days

FINGERPRINTS = {
    "brats 1 mm": {"n_cases": 12, "median_shape": [140.0, 172.0, 140.0], "median_spacing": [1.0, 1.0, 1.0]},
    "small 1 mm": {"n_cases": 30, "median_shape": [60.0, 72.0, 66.0], "median_spacing": [1.0, 1.0, 1.0]},
    "anisotropic": {"n_cases": 8, "median_shape": [40.0, 200.0, 190.0], "median_spacing": [3.0, 0.8, 0.8]},
}


def speed_table(per_voxel=1e-6, overhead=0.05, widths=(16, 32), device="cpu"):
    """A speed table as measure_speed returns it, from a linear cost growing with width squared."""
    points = [{"base_channels": w, "size": [s] * 3, "voxels": 2 * s ** 3,
               "step_seconds": overhead + (w / 16) ** 2 * per_voxel * 2 * s ** 3,
               "forward_seconds": overhead / 5 + (w / 16) ** 2 * per_voxel / 3 * 2 * s ** 3}
              for w in widths for s in (32, 48, 64)]
    return {"device": device, "batch_size": 2, "depth": 3, "points": points}


SPEEDS = {"cpu": speed_table(), "gpu": speed_table(per_voxel=2e-9, overhead=0.02, device="cuda")}
EXPLICITS = [{}, {"data.patch_size": 64}, {"model.base_channels": 16}, {"data.mode": "patch"},
             {"model.depth": 3}, {"train.batch_size": 4}]


def sweep(fp, speed, explicit):
    return [(budget, plan.plan_recipe(fp, budget, speed, explicit)) for budget in BUDGETS]


@pytest.mark.parametrize("fp_name", FINGERPRINTS)
@pytest.mark.parametrize("speed_name", SPEEDS)
@pytest.mark.parametrize("explicit", EXPLICITS, ids=lambda e: ",".join(e) or "none")
def test_a_smaller_budget_never_gives_a_finer_spacing(fp_name, speed_name, explicit):
    plans = sweep(FINGERPRINTS[fp_name], SPEEDS[speed_name], explicit)
    spacings = [p["values"]["data.spacing"] for _, p in plans]
    for (small, coarse), (large, fine) in zip(zip(BUDGETS, spacings), zip(BUDGETS[1:], spacings[1:])):
        assert all(c >= f for c, f in zip(coarse, fine)), f"{small} min -> {coarse} mm, {large} min -> {fine} mm"
    native = FINGERPRINTS[fp_name]["median_spacing"]
    assert all(s >= n for spacing in spacings for s, n in zip(spacing, native)), "finer than the native spacing"


def test_the_budget_moves_the_spacing_across_the_candidates():
    plans = [p["values"] for _, p in sweep(FINGERPRINTS["brats 1 mm"], SPEEDS["cpu"], {})]
    spacings = {tuple(v["data.spacing"]) for v in plans}
    assert (1.0, 1.0, 1.0) in spacings and len(spacings) >= 2  # a small budget coarsens the grid
    patches = {tuple(v["data.patch_size"]) for v in plans if v["data.spacing"] == [1.0, 1.0, 1.0]}
    assert len(patches) >= 3  # at 1 mm a larger budget buys a larger patch before anything else


def test_the_measured_data_point_20_minutes_on_one_core_give_1_mm_patches_of_about_64_cubed():
    # calibrated to docs/accuracy.md: a 64^3 batch of 2 took ~1.1 s a step on one core, and 1 mm 64^3
    # patches with ~800 steps then beat 72x88x72 patches with ~400 and the whole brain at 2 mm
    speed = speed_table(per_voxel=1.1 / (2 * 64 ** 3), overhead=0.0)
    values = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 20, speed, {"model.base_channels": 16})["values"]
    assert values["data.mode"] == "patch" and values["data.spacing"] == [1.0] * 3
    assert 0.6 * 64 ** 3 <= math.prod(values["data.patch_size"]) <= 1.1 * 64 ** 3
    assert values["train.max_steps"] >= plan.TARGET_STEPS and values["train.schedule"] == "poly"


def test_steps_come_before_a_larger_patch_and_the_grid_coarsens_only_under_min_steps():
    fp, speed = FINGERPRINTS["brats 1 mm"], speed_table(per_voxel=1.1 / (2 * 64 ** 3), overhead=0.0)
    plans = {budget: plan.plan_recipe(fp, budget, speed, {"model.base_channels": 16}) for budget in (5, 12, 60)}
    for budget, p in plans.items():
        chosen, values = p["estimates"]["chosen"], p["values"]
        larger = [c for c in p["estimates"]["weighed"] if c["spacing"] == chosen["spacing"]
                  and c["fits"] and math.prod(c["size"]) > math.prod(chosen["size"])]
        assert all(c["steps"] < plan.TARGET_STEPS for c in larger), budget  # no larger sample buys the target
        assert chosen["steps"] >= plan.MIN_STEPS or values["data.spacing"] == [2.0] * 3, budget
    assert plans[12]["values"]["data.spacing"] == [1.0] * 3  # 64^3 buys under TARGET_STEPS but over MIN_STEPS: stays at 1 mm
    assert plans[12]["estimates"]["chosen"]["steps"] < plan.TARGET_STEPS
    assert plans[5]["values"]["data.spacing"] != [1.0] * 3  # 64^3 buys under 400 at 1 mm: a coarser grid
    assert math.prod(plans[60]["values"]["data.patch_size"]) > 64 ** 3  # an hour buys a larger patch


@pytest.mark.parametrize("fp_name", FINGERPRINTS)
@pytest.mark.parametrize("speed_name", SPEEDS)
@pytest.mark.parametrize("explicit", [{}, {"data.mode": "patch"}, {"model.depth": 2}], ids=["none", "patch", "depth"])
def test_a_planned_sample_is_a_multiple_of_2_to_the_depth_and_a_patch_fits_the_padded_median_case(
        fp_name, speed_name, explicit):
    fp = FINGERPRINTS[fp_name]
    modes = set()
    for _, p in sweep(fp, SPEEDS[speed_name], explicit):
        values, step = p["values"], 2 ** p["values"]["model.depth"]
        size = values.get("data.patch_size") or values["data.image_size"]
        assert all(s % step == 0 and s >= step for s in size)
        modes.add(values["data.mode"])
        if values["data.mode"] == "patch":
            shape = resampled_shape(fp["median_shape"], fp["median_spacing"], values["data.spacing"])
            padded = [step * math.ceil(n / step) for n in shape]
            assert all(s <= q for s, q in zip(size, padded)), f"patch {size} exceeds padded median {padded}"
            assert math.prod(size) <= plan.VOXEL_CAP
    assert "patch" in modes or fp_name != "brats 1 mm" or speed_name != "gpu"


def test_explicit_keys_win_and_the_rest_is_planned_around_them():
    fp, speed = FINGERPRINTS["brats 1 mm"], SPEEDS["cpu"]
    explicit = {"data.patch_size": [48, 64, 48], "train.batch_size": 3, "model.depth": 3,
                "train.schedule": "cosine", "train.max_steps": 777, "model.base_channels": 32}
    p = plan.plan_recipe(fp, 25, speed, explicit)
    values = p["values"]
    for key, value in explicit.items():
        assert values[key] == value and p["why"][key] == "set explicitly"
    assert values["data.mode"] == "patch" and "data.image_size" not in values
    assert values["train.val_every"] <= 777 and values["train.warmup_steps"] == round(plan.WARMUP_SHARE * 777)
    spaced = plan.plan_recipe(fp, 400, speed, {"data.spacing": 1.25})["values"]
    assert spaced["data.spacing"] == 1.25  # as given
    assert spaced["data.image_size"] == [112, 136, 112]  # the whole case at 1.25 mm, multiples of 2**3
    spaced = plan.plan_recipe(fp, 25, speed, {"data.spacing": 1.25})["values"]
    assert spaced["data.spacing"] == 1.25 and spaced["data.mode"] == "patch"  # 25 min: patches of it
    assert all(p <= w for p, w in zip(spaced["data.patch_size"], [112, 136, 112]))
    sized = plan.plan_recipe(fp, 25, speed, {"data.image_size": [64, 64, 64]})["values"]
    assert sized["data.mode"] == "resize" and sized["data.image_size"] == [64, 64, 64]
    assert sized["data.spacing"] == [round(n / 64, 4) for n in fp["median_shape"]]


def test_an_explicit_width_must_have_been_timed():
    with pytest.raises(ValueError, match="base_channels 24.*timed only \\[16, 32\\]"):
        plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], {"model.base_channels": 24})


def test_an_explicit_patch_larger_than_the_median_case_stays_at_native_spacing():
    values = plan.plan_recipe(FINGERPRINTS["small 1 mm"], 60, SPEEDS["cpu"], {"data.patch_size": 128})["values"]
    assert values["data.patch_size"] == 128 and values["data.spacing"] == [1.0, 1.0, 1.0]


def test_the_same_data_budget_and_speed_give_the_same_plan():
    fp, speed = FINGERPRINTS["anisotropic"], SPEEDS["gpu"]
    first = plan.plan_recipe(fp, 17, speed, {"train.batch_size": 2})
    second = plan.plan_recipe(json.loads(json.dumps(fp)), 17, json.loads(json.dumps(speed)), {"train.batch_size": 2})
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["inputs"]["budget_minutes"] == 17 and first["inputs"]["speed"] == speed


@pytest.mark.parametrize("budget", [0, 0.0, None])
def test_no_budget_changes_nothing(budget):
    p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], budget, SPEEDS["cpu"], {"data.patch_size": 64})
    assert p["values"] == {} and "plain defaults" in p["why"]["plan"]
    assert "nothing planned" in report.format_plan(p)


def test_validation_takes_at_most_its_share_of_the_budget():
    for fp in FINGERPRINTS.values():
        for budget, p in sweep(fp, SPEEDS["cpu"], {}):
            chosen = p["estimates"]["chosen"]
            assert 1 <= chosen["validations"] <= plan.MAX_VALIDATIONS
            if chosen["validations"] > 1:
                assert chosen["validations"] * chosen["validation_seconds"] <= plan.VAL_SHARE * 60 * budget + 1e-9
            values = p["values"]
            assert values["train.max_steps"] // values["train.val_every"] >= chosen["validations"] or \
                values["train.max_steps"] < chosen["validations"]


def test_format_and_write_plan(tmp_path):
    p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], {})
    text = report.format_plan(p)
    assert all(key in text for key in p["values"]) and len(text.splitlines()) == len(p["values"]) + 1
    path = report.write_plan(str(tmp_path), p)
    assert path == os.path.join(str(tmp_path), "plan.json")
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(p))
    assert [name for name in os.listdir(tmp_path)] == ["plan.json"]  # no temporary file left behind


def test_fit_line_recovers_a_line_and_stays_positive():
    assert fit_line([1, 2, 3], [1.5, 2.5, 3.5]) == pytest.approx((0.5, 1.0))
    intercept, slope = fit_line([1, 2, 3], [3.0, 2.0, 2.5])  # noise: a negative slope
    assert intercept == 0 and slope > 0
    assert fit_line([8], [2.0]) == (0.0, 0.25)


# ----------------------------------------------------------------------------- real files and torch

def write_cases(folder, shapes, spacings):
    rng = np.random.default_rng(0)
    paths = []
    for i, (shape, spacing) in enumerate(zip(shapes, spacings)):
        image, mask = blob_case(rng, shape, with_enhancing=i != 1)
        paths.append(write_case(os.path.join(folder, f"case_{i}.h5"), image, mask, spacing=spacing))
    return paths


def test_fingerprint_of_three_tiny_cases(tmp_path):
    shapes = [(20, 24, 22), (18, 26, 20), (22, 22, 24)]
    spacings = [(1.0, 1.0, 1.0), (1.2, 1.0, 1.0), (1.0, 0.9, 1.0)]
    paths = write_cases(str(tmp_path), shapes, spacings)
    fp = fingerprint.fingerprint(paths, CaseFormat())
    assert fp["n_cases"] == 3
    assert fp["median_shape"] == [20, 24, 22] and fp["median_spacing"] == [1.0, 1.0, 1.0]
    assert fp["cases_without_region"] == {"WT": 0, "TC": 0, "ET": 1}
    from cases.h5 import read_case
    cases = [read_case(p) for p in paths]
    counts = [labels_to_regions(c.mask).sum((1, 2, 3)).tolist() for c in cases]
    assert fp["median_region_voxels"] == {r: float(np.median([c[i] for c in counts])) for i, r in enumerate(REGIONS)}
    brains = [np.any(c.image != 0, axis=0) for c in cases]
    assert fp["median_brain_voxels"] == float(np.median([b.sum() for b in brains]))
    flair_means = [c.image[0][c.image[0] != 0].mean() for c in cases]
    assert fp["intensity"][0]["mean"] == pytest.approx(float(np.median(flair_means)))
    assert len(fp["intensity"]) == 4 and fp["intensity"][2]["p99_5"] > fp["intensity"][2]["p00_5"]
    assert fp["smallest_region"]["name"] == "ET"
    assert fp["smallest_region"]["share"] == min(fp["median_region_share"].values())
    assert fingerprint.fingerprint(list(reversed(paths)), CaseFormat()) == fp  # deterministic, order-free
    json.dumps(fp)


def test_fingerprint_names_a_bad_file(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="broken.h5"):
        fingerprint.fingerprint([str(bad)], CaseFormat())


def test_measure_speed_gives_a_table_the_planner_reads():
    model_cfg = ModelConfig(base_channels=4, depth=2)
    speed = measure_speed(model_cfg, "cpu", sizes=((16, 16, 16), (8, 16, 16)), batch_size=1, repeats=1)
    assert speed["device"] == "cpu" and speed["batch_size"] == 1 and speed["depth"] == 2
    assert [(p["base_channels"], p["size"], p["voxels"]) for p in speed["points"]] == \
        [(4, [16, 16, 16], 4096), (4, [8, 16, 16], 2048)]
    assert all(p["step_seconds"] > 0 and p["forward_seconds"] > 0 for p in speed["points"])
    fp = {"n_cases": 3, "median_shape": [20.0, 24.0, 22.0], "median_spacing": [1.0, 1.0, 1.0]}
    values = plan.plan_recipe(fp, 1, speed)["values"]
    assert values["model.base_channels"] == 4 and values["train.max_steps"] >= 0


def test_every_planned_key_says_why():
    for explicit in EXPLICITS:
        p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], explicit)
        assert set(p["why"]) >= set(p["values"]) and all(p["why"][key] for key in p["values"])
    implied = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], {"data.patch_size": 64})
    assert implied["why"]["data.mode"] == "implied by the explicit data.patch_size"


def test_measure_speed_stops_timing_sizes_after_max_seconds_but_keeps_one_per_width():
    speed = measure_speed(ModelConfig(base_channels=2, depth=1), "cpu", sizes=((8, 8, 8), (16, 16, 16)),
                                      batch_size=1, widths=(2, 4), repeats=1, max_seconds=0)
    assert [(p["base_channels"], p["size"]) for p in speed["points"]] == [(2, [8, 8, 8]), (4, [8, 8, 8])]


# ------------------------------------------------------------------------------------- end to end

def test_main_with_a_budget_plans_trains_evaluates_and_keeps_explicit_keys(tiny_dataset, tmp_path, monkeypatch):
    import main
    from runtime.checkpoint import load_checkpoint
    main.main(["--data.dir", tiny_dataset, "--train.max_minutes", "0.1", "--train.out_dir", str(tmp_path),
               "--train.name", "planned", "--model.base_channels", "4", "--train.batch_size", "3",
               "--data.num_workers", "0"])
    run_dir = tmp_path / "planned"
    saved = json.loads((run_dir / "plan.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    values = saved["values"]
    assert values["train.schedule"] == "poly" and values["train.batch_dice"] is True and values["train.epochs"] == 0
    for key in ("model.base_channels", "train.batch_size"):  # explicit keys win, end to end
        assert saved["why"][key] == "set explicitly" and saved["inputs"]["explicit"][key] in (4, 3)
    assert (config["model"]["base_channels"], config["train"]["batch_size"]) == (4, 3)
    refitted = ("train.max_steps", "train.val_every")  # fitted to the first round's pace (train.refit_steps)
    for key, value in values.items():  # config.json (what evaluation rebuilds) is the planned config
        section, name = key.split(".")
        assert config[section][name] == value or key in refitted, key
    assert config["data"]["image_size" if values["data.mode"] == "resize" else "patch_size"] is not None
    state = load_checkpoint(str(run_dir / "last.pt"))  # best.pt may predate the last step re-fit
    assert state["config"] == config and state["scheduler"] is None
    assert (run_dir / "summary.json").is_file()  # evaluated
    assert saved["inputs"]["budget_minutes"] < 0.1  # the measurement counted against the budget
    # a resumed run keeps the saved plan: its config is the checkpoint's, nothing is measured again
    monkeypatch.setattr(main, "measure_speed", lambda *a, **k: pytest.fail("resume measured the speed again"))
    main.main(["--resume", str(run_dir)])
    assert json.loads((run_dir / "plan.json").read_text()) == saved
    assert json.loads((run_dir / "config.json").read_text()) == config


def test_no_plan_without_a_budget_or_with_plan_off(tiny_dataset):
    import main
    cfg = main.build_config({"data.dir": tiny_dataset, "train.max_minutes": "0.05", "train.plan": "off"})
    assert main.make_plan(cfg, {}, {"train": [], "val": []}, None, 0) is None  # off: nothing planned or measured
    cfg.train.plan, cfg.train.max_minutes = "auto", 0
    assert main.make_plan(cfg, {}, {"train": [], "val": []}, None, 0) is None  # no budget: nothing planned


def test_2d_slices_plan_only_the_schedule_for_the_budget():
    fp = {"n_cases": 30, "median_shape": [24, 256, 256], "median_spacing": [1.0, 1.0, 1.0]}
    speed = {"device": "cpu", "batch_size": 16, "depth": 4,
             "points": [{"base_channels": 32, "size": [128, 128], "voxels": 16 * 128 * 128,
                         "step_seconds": 0.5, "forward_seconds": 0.16}]}
    explicit = {"data.mode": "slices", "model.dims": 2, "model.base_channels": 32}
    short, long = (plan.plan_recipe(fp, minutes, speed, explicit, val_cases=5) for minutes in (10, 30))
    for planned in (short, long):
        values = planned["values"]
        assert set(values) == {"train.schedule", "train.warmup_steps", "train.max_steps", "train.val_every",
                               "train.epochs"}  # network, slice size and batch stay as configured
        assert values["train.schedule"] == "poly" and values["train.epochs"] == 0
        validation_s = 5 * 24 * 0.16 / 16
        assert values["train.max_steps"] * 0.5 + planned["estimates"]["validations"] * validation_s <= \
            60 * planned["inputs"]["budget_minutes"]
    assert long["values"]["train.max_steps"] > 2.5 * short["values"]["train.max_steps"]
    fixed = plan.plan_recipe(fp, 30, speed, {**explicit, "train.max_steps": 500}, val_cases=5)
    assert fixed["values"]["train.max_steps"] == 500 and fixed["why"]["train.max_steps"] == "set explicitly"
    capped = plan.plan_recipe(fp, 30, speed, {**explicit, "train.epochs": 50}, val_cases=5)  # as lgg2d's preset
    assert capped["values"]["train.epochs"] == 50 and "stops after 50 epochs" in capped["why"]["train.epochs"]
