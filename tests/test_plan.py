"""The planner: fingerprint of real files, the pure plan rule on synthetic fingerprints and speed
tables, a tiny timing of training's own step (its shape, never its timing), and plan.json of a run."""
import json
import math
import os

import numpy as np
import pytest
import torch

from cases.h5 import CaseFormat, write_case
from config import PLANNER, Config, apply_dict
from conftest import blob_case
from planning import fingerprint, plan, planner, report
from planning import speed as speed_module
from planning.speed import fit_line, measure_speed
from transforms.regions import REGIONS, labels_to_regions
from transforms.resample import resampled_shape

BUDGETS = [0.5 * 1.25 ** i for i in range(40)]  # 0.5 min to ~2 days

FINGERPRINTS = {
    "brats 1 mm": {"n_cases": 12, "median_shape": [140.0, 172.0, 140.0], "median_spacing": [1.0, 1.0, 1.0]},
    "small 1 mm": {"n_cases": 30, "median_shape": [60.0, 72.0, 66.0], "median_spacing": [1.0, 1.0, 1.0]},
    "anisotropic": {"n_cases": 8, "median_shape": [40.0, 200.0, 190.0], "median_spacing": [3.0, 0.8, 0.8]},
}


def speed_table(per_voxel=1e-6, overhead=0.05, device="cpu"):
    """A speed table as measure_speed returns it, from a cost linear in the voxels of a batch."""
    points = [{"base_channels": 16, "size": [s] * 3, "voxels": 2 * s ** 3,
               "step_seconds": overhead + per_voxel * 2 * s ** 3,
               "forward_seconds": overhead / 5 + per_voxel / 3 * 2 * s ** 3}
              for s in (32, 48, 64)]
    return {"device": device, "batch_size": 2, "depth": 3, "base_channels": 16, "points": points}


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
    assert values["train.max_steps"] >= PLANNER.target_steps and values["train.schedule"] == "poly"


def test_steps_come_before_a_larger_patch_and_the_grid_coarsens_only_under_min_steps():
    fp, speed = FINGERPRINTS["brats 1 mm"], speed_table(per_voxel=1.1 / (2 * 64 ** 3), overhead=0.0)
    plans = {budget: plan.plan_recipe(fp, budget, speed, {"model.base_channels": 16}) for budget in (5, 12, 60)}
    for budget, p in plans.items():
        chosen, values = p["estimates"]["chosen"], p["values"]
        larger = [c for c in p["estimates"]["weighed"] if c["spacing"] == chosen["spacing"]
                  and c["fits"] and math.prod(c["size"]) > math.prod(chosen["size"])]
        assert all(c["steps"] < PLANNER.target_steps for c in larger), budget  # no larger sample buys the target
        assert chosen["steps"] >= PLANNER.min_steps or values["data.spacing"] == [2.0] * 3, budget
    assert plans[12]["values"]["data.spacing"] == [1.0] * 3  # 64^3 buys under TARGET_STEPS but over MIN_STEPS: stays at 1 mm
    assert plans[12]["estimates"]["chosen"]["steps"] < PLANNER.target_steps
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
            assert math.prod(size) <= PLANNER.voxel_cap
    assert "patch" in modes or fp_name != "brats 1 mm" or speed_name != "gpu"


def test_explicit_keys_win_and_the_rest_is_planned_around_them():
    fp, speed = FINGERPRINTS["brats 1 mm"], SPEEDS["cpu"]
    explicit = {"data.patch_size": [48, 64, 48], "train.batch_size": 3, "model.depth": 3,
                "train.schedule": "cosine", "train.max_steps": 777}
    p = plan.plan_recipe(fp, 25, speed, explicit)
    values = p["values"]
    for key, value in explicit.items():
        assert values[key] == value and p["why"][key] == "set explicitly"
    assert values["data.mode"] == "patch" and "data.image_size" not in values
    assert values["train.val_every"] <= 777 and values["train.warmup_steps"] == round(PLANNER.warmup_share * 777)
    spaced = plan.plan_recipe(fp, 400, speed, {"data.spacing": 1.25})["values"]
    assert spaced["data.spacing"] == 1.25  # as given
    assert spaced["data.image_size"] == [112, 136, 112]  # the whole case at 1.25 mm, multiples of 2**3
    spaced = plan.plan_recipe(fp, 25, speed, {"data.spacing": 1.25})["values"]
    assert spaced["data.spacing"] == 1.25 and spaced["data.mode"] == "patch"  # 25 min: patches of it
    assert all(p <= w for p, w in zip(spaced["data.patch_size"], [112, 136, 112]))
    sized = plan.plan_recipe(fp, 25, speed, {"data.image_size": [64, 64, 64]})["values"]
    assert sized["data.mode"] == "resize" and sized["data.image_size"] == [64, 64, 64]
    assert sized["data.spacing"] == [round(n / 64, 4) for n in fp["median_shape"]]


def test_the_width_stays_as_configured_and_the_plan_does_not_claim_it():
    for explicit in ({}, {"model.base_channels": 24}):
        p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], explicit)
        assert "model.base_channels" not in p["values"] and "model.base_channels" not in p["why"]
        assert p["estimates"]["chosen"]["base_channels"] == 16  # the width the speed table timed


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
            assert 1 <= chosen["validations"] <= PLANNER.max_validations
            if chosen["validations"] > 1:
                assert chosen["validations"] * chosen["validation_seconds"] <= PLANNER.val_share * 60 * budget + 1e-9
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


def tiny_config(**overrides):
    cfg = Config()
    apply_dict(cfg, {"model.base_channels": 4, "model.depth": 2, "data.num_workers": 0, **overrides})
    return cfg


def test_measure_speed_times_training_steps_with_their_data_through_the_training_loader(tmp_path, monkeypatch):
    paths = write_cases(str(tmp_path), [(20, 24, 22), (18, 26, 20), (22, 22, 24)], [(1.0, 1.0, 1.0)] * 3)
    calls = {"step": 0, "loader": 0}
    real_step, real_loader = speed_module.train_step, speed_module.make_loader

    def counted_step(run, batch):
        calls["step"] += 1
        assert run.loss_fn.__class__.__name__ == "DiceBCELoss" and run.optimizer.__class__.__name__ == "Adam"
        assert tuple(batch["image"].shape[2:]) == tuple(run.cfg.data.patch_size)  # the loader's patches
        return real_step(run, batch)

    def counted_loader(*args, **kwargs):
        calls["loader"] += 1
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(speed_module, "train_step", counted_step)
    monkeypatch.setattr(speed_module, "make_loader", counted_loader)
    sizes = ((8, 16, 16), (16, 16, 16))
    speed = measure_speed(tiny_config(), paths, "cpu", sizes, batch_size=2, steps=2)
    assert speed["device"] == "cpu" and speed["batch_size"] == 2 and speed["depth"] == 2
    assert speed["base_channels"] == 4 and speed["threads"] >= 1
    assert [(p["size"], p["voxels"]) for p in speed["points"]] == [([8, 16, 16], 4096), ([16, 16, 16], 8192)]
    assert calls["step"] == 2 * (2 + 2)  # at each size two warm-up steps (a full batch, a last one of 1) and two
    # timed ones, all through train_step
    assert calls["loader"] >= 2 * 2  # 3 cases in batches of 2: a new epoch's loader every 2 steps, as training
    for p in speed["points"]:
        assert p["step_seconds"] >= p["data_seconds"] > 0 and p["forward_seconds"] > 0  # loading counts
    fp = {"n_cases": 3, "median_shape": [20.0, 24.0, 22.0], "median_spacing": [1.0, 1.0, 1.0]}
    values = plan.plan_recipe(fp, 1, speed)["values"]
    assert values["train.max_steps"] >= 1 and "model.base_channels" not in values


def test_measure_speed_starts_no_size_that_would_end_past_max_seconds(tmp_path):
    paths = write_cases(str(tmp_path), [(16, 16, 16)] * 2, [(1.0, 1.0, 1.0)] * 2)
    speed = measure_speed(tiny_config(), paths, "cpu", ((8, 8, 8), (16, 16, 16)), batch_size=1, steps=1,
                          max_seconds=0)
    assert [p["size"] for p in speed["points"]] == [[8, 8, 8]]  # the first is always timed
    both = measure_speed(tiny_config(), paths, "cpu", ((8, 8, 8), (16, 16, 16)), batch_size=1, steps=1)
    assert [p["size"] for p in both["points"]] == [[8, 8, 8], [16, 16, 16]]


def test_3d_speed_is_timed_at_cubes_of_the_planners_sides():
    sizes, batch = planner.speed_sizes(tiny_config(), torch.device("cpu"))  # cubes, multiples of 2**depth
    assert batch == PLANNER.batch_size and all(s % 4 == 0 and len(set(size)) == 1 for size in sizes for s in size)
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == len(PLANNER.speed_sides_cpu)  # largest first


def test_every_planned_key_says_why():
    for explicit in EXPLICITS:
        p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], explicit)
        assert set(p["why"]) >= set(p["values"]) and all(p["why"][key] for key in p["values"])
    implied = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], {"data.patch_size": 64})
    assert implied["why"]["data.mode"] == "implied by the explicit data.patch_size"


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
    assert saved["why"]["train.batch_size"] == "set explicitly"  # explicit keys win, end to end
    assert (saved["inputs"]["explicit"]["model.base_channels"], saved["inputs"]["explicit"]["train.batch_size"]) \
        == (4, 3) and saved["inputs"]["speed"]["base_channels"] == 4  # the width trained is the width timed
    assert (config["model"]["base_channels"], config["train"]["batch_size"]) == (4, 3)
    refitted = ("train.max_steps", "train.val_every")  # fitted to the first round's pace (train.refit_steps)
    for key, value in values.items():  # config.json (what evaluation rebuilds) is the planned config
        section, name = key.split(".")
        assert config[section][name] == value or key in refitted, key
    assert config["data"]["image_size" if values["data.mode"] == "resize" else "patch_size"] is not None
    state = load_checkpoint(str(run_dir / "last.pt"))  # best.pt may predate the last step re-fit
    assert state["config"] == config and state["scheduler"] is None
    assert (run_dir / "summary.json").is_file()  # evaluated
    # 6 cases: too few for a test split the user did not ask for; plan.json says what was held out and why
    assert saved["held_out"]["cases"] == {"train": 5, "val": 1, "test": 0}
    assert saved["held_out"]["test"].startswith("no test split: 6 cases")
    assert saved["held_out"]["val"].startswith("1 cases (data.val_fraction 0.15)")
    assert saved["inputs"]["budget_minutes"] < 0.1  # the measurement counted against the budget
    # plan.json says the steps planned and, once training ended, the steps made
    assert saved["steps"] == {"planned": values["train.max_steps"], "made": state["step"]} and state["step"] > 0
    # a resumed run keeps the saved plan: its config is the checkpoint's, nothing is measured again
    monkeypatch.setattr(planner, "measure_speed", lambda *a, **k: pytest.fail("resume measured the speed again"))
    main.main(["--resume", str(run_dir)])
    resumed = json.loads((run_dir / "plan.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "steps"} == {k: v for k, v in saved.items() if k != "steps"}
    made = load_checkpoint(str(run_dir / "last.pt"))["step"]  # the steps of both sessions
    assert resumed["steps"] == {"planned": values["train.max_steps"], "made": made} and made >= state["step"]
    assert json.loads((run_dir / "config.json").read_text()) == config


def test_no_plan_without_a_budget_or_with_plan_off(tiny_dataset):
    cfg = tiny_config(**{"data.dir": tiny_dataset, "train.max_minutes": 0.05, "train.plan": "off"})
    assert planner.make_plan(cfg, {}, {"train": [], "val": []}, None, 0) is None  # off: nothing planned or measured
    cfg.train.plan, cfg.train.max_minutes = "auto", 0
    assert planner.make_plan(cfg, {}, {"train": [], "val": []}, None, 0) is None  # no budget: nothing planned


def test_the_made_steps_go_into_plan_json_beside_the_planned_ones(tmp_path):
    p = plan.plan_recipe(FINGERPRINTS["brats 1 mm"], 25, SPEEDS["cpu"], {})
    assert p["steps"] == {"planned": p["values"]["train.max_steps"], "made": None}
    assert report.record_made_steps(str(tmp_path), 5) is None  # no plan, nothing written
    assert os.listdir(tmp_path) == []
    report.write_plan(str(tmp_path), p)
    recorded = report.record_made_steps(str(tmp_path), 123)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved == recorded and saved["steps"] == {"planned": p["values"]["train.max_steps"], "made": 123}
    assert os.listdir(tmp_path) == ["plan.json"]
