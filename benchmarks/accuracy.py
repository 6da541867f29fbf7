"""Accuracy on real scans for a fixed budget: training recipes side by side on one patient-level split.

    python bench.py --accuracy --data.dir DIR --train.max_minutes 25 [--recipe NAME ...] [--folds N]
                    [--preset NAME] [--work DIR] [--out FILE] [--section.key VALUE ...]

A test set of about 30% of the patients (chosen by data.split_seed; two scans of a patient are
never split, see cases/patients.py) is held out, or with --folds N the patients are dealt into N folds
and each fold is the test set once (leave-one-out when N is the number of patients). Each recipe
trains with main.py in its own process (same cases, same budget, memory freed between runs) on
the other cases, with data.val_fraction of them for validation and postprocessing, then
evaluate.py scores its best.pt on the test cases at their native grid, once as shipped and once
with postprocessing off (per_case rows gain raw_<region>_dice and raw_<region>_sensitivity), so every
case shows what postprocessing did to it. Prints one row per recipe (Dice per region: mean, standard
deviation and worst case over every test case of every fold; mean HD95 where scored; cases whose first
region scored under 0.5; found tumours (raw sensitivity >= 0.5) whose Dice postprocessing halved; the
minutes main.py ran) and writes accuracy.json, with each run's planned and made steps from plan.json.
Any --section.key VALUE pairs go to every recipe, after the recipe's own keys (so they win); --preset
goes to every recipe's main.py. Both tasks are scored: BraTS (WT, TC, ET) and binary (tumour, e.g.
--preset lgg2d). Recipes (RECIPES): "planned" only the budget (main.py plans the recipe for it,
docs/training.md); for BraTS two fixed recipes with the planner off (Adam, ReduceLROnPlateau, early
stopping, as plain `python main.py`): "patch64" 1 mm 64^3 patches, 8 per case, and "resize80" the
whole brain-cropped case resized to 80x96x80; for slices "slices128" docs/lgg.md's CPU recipe (128^2
slices, 2.5D context 1, width 16, depth 4, lr 1e-3) with only its schedule planned.
"""
import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

from cases.h5 import DataError, case_id_of
from cases.patients import group_by_patient
from cases.splits import list_cases
from config import TASK_REGIONS, build_config, check
from overrides import split_args
from runtime.atomic import write_json

log = logging.getLogger("accuracy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, where main.py is
RECIPES = {
    "planned": {},
    "patch64": {"data.mode": "patch", "data.patch_size": "64", "data.patches_per_case": "8", "train.plan": "off"},
    "resize80": {"data.mode": "resize", "data.image_size": "80,96,80", "train.plan": "off"},
    "slices128": {"data.image_size": "128,128", "data.slice_context": "1", "model.in_channels": "9",
                  "model.base_channels": "16", "model.depth": "4", "train.lr": "1e-3"},
}
TASK_RECIPES = {"brats": ("planned", "patch64", "resize80"), "binary": ("planned", "slices128")}  # the defaults
TEST_FRACTION = 0.3
DETECTED = 0.5   # raw sensitivity of the first region at which a case counts as a found tumour
FORCED = ("data.dir", "data.test_fraction", "train.out_dir", "train.name")  # set per run, here
RAW = {"eval.largest_component": "false", "eval.min_component_voxels": "0", "eval.unsure_component_voxels": "0",
       "eval.minor_component_share": "0", "eval.postprocess_et_min": "0"}  # postprocessing off: these win over what best.pt stores


def patient_folds(case_ids, folds=0, test_fraction=TEST_FRACTION, seed=0):
    """Test sets (lists of case ids), whole patients each: one holding about `test_fraction` of the
    patients (folds 0), or `folds` disjoint ones that together hold every patient."""
    groups = group_by_patient(sorted(case_ids))
    patients = sorted(groups)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    if folds:
        if not 2 <= folds <= len(patients):
            raise ValueError(f"--folds {folds}: choose 2 to {len(patients)} (the number of patients; "
                             f"{len(patients)} is leave-one-out)")
        chunks = np.array_split(np.arange(len(order)), folds)
    else:
        chunks = [np.arange(max(1, round(len(order) * test_fraction)))]
    tests = [sorted(c for i in chunk for c in groups[order[i]]) for chunk in chunks]
    if any(len(case_ids) - len(test) < 2 for test in tests):
        raise ValueError(f"{len(patients)} patients are too few: every test set must leave at least two "
                         f"cases to train and validate on")
    return tests


def link_cases(folder, paths):
    """A folder of links to the case files (the data are never copied); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        link = os.path.join(folder, os.path.basename(path))
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(path), link)
    return folder


def call(args, log_path):
    """Run a command with its output appended to log_path; a failure names the log."""
    with open(log_path, "a") as out:
        out.write("$ " + " ".join(args) + "\n")
        out.flush()
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        with open(log_path) as f:
            last = (f.read().strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{os.path.basename(args[1])} exited with {code} ({last}); full output in {log_path}")


def flat(pairs):
    return [item for key, value in pairs.items() for item in (f"--{key}", str(value))]


def score_test_cases(checkpoint, test_dir, out, log_path, extra=()):
    """evaluate.py on every case of test_dir; returns the rows of its per_case.csv."""
    call([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", checkpoint, "--data.dir", test_dir,
          "--split", "all", "--out", out, "--no-overlays", *extra], log_path)
    with open(os.path.join(out, "per_case.csv")) as f:
        return list(csv.DictReader(f))


def train_and_test(overrides, train_dir, test_dir, run_dir, regions, preset=None):
    """Train one recipe on the cases of train_dir, score best.pt on test_dir as shipped and with
    postprocessing off; returns (per-case rows with raw_* columns added, minutes main.py ran, the
    steps {"planned", "made"} of plan.json or None)."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "output.log")
    forced = {"data.dir": train_dir, "data.test_fraction": 0, "train.out_dir": run_dir, "train.name": "train"}
    start = time.time()
    call([sys.executable, os.path.join(ROOT, "main.py"), *(["--preset", preset] if preset else []),
          *flat({**overrides, **forced})], log_path)
    minutes = (time.time() - start) / 60
    best = os.path.join(run_dir, "train", "best.pt")
    rows = score_test_cases(best, test_dir, os.path.join(run_dir, "test"), log_path)
    raw = score_test_cases(best, test_dir, os.path.join(run_dir, "test_raw"), log_path, flat(RAW))
    for row, raw_row in zip(rows, raw):
        row.update({f"raw_{r}_{m}": raw_row[f"{r}_{m}"] for r in regions for m in ("dice", "sensitivity")})
    return rows, minutes, read_steps(os.path.join(run_dir, "train", "plan.json"))


def read_steps(plan_path):
    """{"planned", "made"} steps a planned run's plan.json records, None without a plan."""
    if not os.path.isfile(plan_path):
        return None
    with open(plan_path) as f:
        return json.load(f).get("steps")


def column(rows, key):
    """A per_case.csv column as floats, None when the column is absent or empty."""
    values = [row.get(key, "") for row in rows]
    return None if "" in values else [float(v) for v in values]


def halved_detections(rows, region):
    """Cases whose `region` was found (raw sensitivity >= DETECTED) and postprocessing left under half of
    the raw Dice."""
    return [row["case"] for row in rows if f"raw_{region}_dice" in row
            and float(row[f"raw_{region}_sensitivity"]) >= DETECTED
            and float(row[f"{region}_dice"]) < 0.5 * float(row[f"raw_{region}_dice"])]


def summarise_recipe(rows, minutes, regions, steps=()):
    """Over the test cases: Dice per region (mean, sd, median, worst, and raw: postprocessing off), HD95
    means where scored, cases whose first region scored under 0.5, detections postprocessing halved,
    the minutes and the planned and made steps of every run."""
    dice = {r: column(rows, f"{r}_dice") for r in regions}
    raw = {r: column(rows, f"raw_{r}_dice") for r in regions}
    hd95 = {r: column(rows, f"{r}_hd95") for r in regions}
    return {"dice": {r: float(np.mean(v)) for r, v in dice.items()},
            "dice_sd": {r: float(np.std(v)) for r, v in dice.items()},
            "dice_median": {r: float(np.median(v)) for r, v in dice.items()},
            "dice_worst": {r: float(np.min(v)) for r, v in dice.items()},
            "raw_dice": {r: float(np.mean(v)) for r, v in raw.items() if v is not None},
            "hd95": {r: float(np.mean(v)) for r, v in hd95.items() if v is not None},
            "under_half": [row["case"] for row in rows if float(row[f"{regions[0]}_dice"]) < 0.5],
            "detections_halved": halved_detections(rows, regions[0]),
            "cases": len(rows), "minutes": round(sum(minutes), 2), "minutes_per_run": minutes,
            "steps_per_run": list(steps), "per_case": rows}


def format_recipe_table(results):
    """One row per recipe: Dice mean ± sd (worst) per region, HD95 means, cases under 0.5 and halved."""
    regions = list(next(iter(results.values()))["dice"])
    lines = [f"{'recipe':<12}" + "".join(f"{'Dice ' + r + ' ± sd (worst)':>27}" for r in regions)
             + "".join(f"{'HD95 ' + r:>13}" for r in regions) + f"{'<0.5':>6}{'halved':>8}{'cases':>7}{'minutes':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<12}" + "".join(f"{r['dice'][g]:>12.3f} ± {r['dice_sd'][g]:.3f} ({r['dice_worst'][g]:.2f})"
                                             for g in regions)
                     + "".join(f"{r['hd95'][g]:>13.1f}" if g in r["hd95"] else f"{'-':>13}" for g in regions)
                     + f"{len(r['under_half']):>6}{len(r['detections_halved']):>8}{r['cases']:>7}{r['minutes']:>9.1f}")
    return "\n".join(lines)


def run_recipes(pairs, recipes, folds, work, preset=None):
    """Every recipe on every fold; returns the accuracy.json content."""
    cfg = check(build_config(pairs, preset))
    regions = list(TASK_REGIONS[cfg.data.task])
    recipes = recipes or TASK_RECIPES[cfg.data.task]
    if cfg.train.max_minutes <= 0:
        raise ValueError("--train.max_minutes: give the training budget in minutes (the same for every recipe)")
    paths = list_cases(os.path.abspath(cfg.data.dir))
    tests = patient_folds([case_id_of(p) for p in paths], folds, TEST_FRACTION, cfg.data.split_seed)
    passed = {k: v for k, v in pairs.items() if k not in FORCED}
    rows, minutes, steps = ({name: [] for name in recipes} for _ in range(3))
    for fold, test in enumerate(tests):
        fold_dir = os.path.join(work, f"fold{fold}")
        train_dir = link_cases(os.path.join(fold_dir, "train_cases"), [p for p in paths if case_id_of(p) not in test])
        test_dir = link_cases(os.path.join(fold_dir, "test_cases"), [p for p in paths if case_id_of(p) in test])
        for name in recipes:
            overridden = sorted(set(RECIPES[name]) & set(passed))
            if overridden and fold == 0:
                log.warning("recipe %s: %s given on the command line replace the recipe's own", name,
                            ", ".join(overridden))
            log.info("fold %d/%d, recipe %s: training for %g minutes, testing on %d cases", fold + 1, len(tests),
                     name, cfg.train.max_minutes, len(test))
            case_rows, used, made = train_and_test({**RECIPES[name], **passed}, train_dir, test_dir,
                                                   os.path.join(fold_dir, name), regions, preset)
            rows[name] += case_rows
            minutes[name].append(round(used, 2))
            steps[name].append(made)
    return {"data_dir": os.path.abspath(cfg.data.dir), "max_minutes": cfg.train.max_minutes, "folds": folds,
            "split_seed": cfg.data.split_seed, "test_sets": tests, "preset": preset, "overrides": passed,
            "recipes": {name: {"keys": RECIPES[name], **summarise_recipe(rows[name], minutes[name], regions, steps[name])}
                        for name in recipes}}


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                        help="recipe to train (repeat for several; default: the task's, TASK_RECIPES)")
    parser.add_argument("--preset", default=None, help="config preset every recipe starts from (e.g. lgg2d)")
    parser.add_argument("--folds", type=int, default=0, help="N folds over the patients (0: one ~30%% test set)")
    parser.add_argument("--work", default=os.path.join("runs", time.strftime("accuracy-%Y%m%d-%H%M%S")),
                        help="folder for the runs, their logs and accuracy.json")
    parser.add_argument("--out", default=None, help="where to write accuracy.json (default: WORK/accuracy.json)")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = os.path.abspath(args.work)
    try:
        result = run_recipes(pairs, list(dict.fromkeys(args.recipe or ())), args.folds, work, args.preset)
    except (DataError, KeyError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    out = args.out or os.path.join(work, "accuracy.json")
    write_json(out, result)
    print(format_recipe_table(result["recipes"]))
    print(f"runs in {work}; figures in {out}")
    return result


if __name__ == "__main__":
    main()
