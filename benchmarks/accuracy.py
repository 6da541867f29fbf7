"""Accuracy on real scans for a fixed budget: training recipes side by side on one patient-level split.

    python bench.py --accuracy --data.dir DIR --train.max_minutes 25 [--recipe NAME ...] [--folds N]
                    [--work DIR] [--out FILE] [--section.key VALUE ...]

A test set of about 30% of the patients (chosen by data.split_seed; two scans of a patient are
never split, see cases/patients.py) is held out, or with --folds N the patients are dealt into N folds
and each fold is the test set once (leave-one-out when N is the number of patients). Each recipe
trains with main.py in its own process (same cases, same budget, memory freed between runs) on
the other cases, with data.val_fraction of them for validation and postprocessing, then
evaluate.py scores its best.pt on the test cases at their native grid. Prints one row per recipe
(Dice and HD95 per region, means over every test case of every fold, and the minutes main.py ran)
and writes accuracy.json. Any --section.key VALUE pairs go to every recipe, after the recipe's own
keys (so they win). Recipes (RECIPES): "planned" only the budget (main.py plans the recipe for it,
docs/training.md), and two fixed recipes with the planner off (Adam, ReduceLROnPlateau, early
stopping, as plain `python main.py`): "patch64" 1 mm 64^3 patches, 8 per case, and "resize80" the
whole brain-cropped case resized to 80x96x80.
"""
import argparse
import csv
import logging
import os
import subprocess
import sys
import time

import numpy as np

from cases.h5 import DataError, case_id_of
from cases.patients import group_by_patient
from cases.splits import list_cases
from config import build_config, check
from overrides import split_args
from runtime.atomic import write_json

log = logging.getLogger("accuracy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, where main.py is
RECIPES = {
    "planned": {},
    "patch64": {"data.mode": "patch", "data.patch_size": "64", "data.patches_per_case": "8", "train.plan": "off"},
    "resize80": {"data.mode": "resize", "data.image_size": "80,96,80", "train.plan": "off"},
}
TEST_FRACTION = 0.3
REGIONS = ("WT", "TC", "ET")
FORCED = ("data.dir", "data.test_fraction", "train.out_dir", "train.name")  # set per run, here


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


def train_and_test(overrides, train_dir, test_dir, run_dir):
    """Train one recipe on the cases of train_dir, score best.pt on test_dir; returns
    (per-case rows of per_case.csv, minutes main.py ran)."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "output.log")
    forced = {"data.dir": train_dir, "data.test_fraction": 0, "train.out_dir": run_dir, "train.name": "train"}
    start = time.time()
    call([sys.executable, os.path.join(ROOT, "main.py"), *flat({**overrides, **forced})], log_path)
    minutes = (time.time() - start) / 60
    test_out = os.path.join(run_dir, "test")
    call([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint", os.path.join(run_dir, "train", "best.pt"),
          "--data.dir", test_dir, "--split", "all", "--out", test_out, "--no-overlays"], log_path)
    with open(os.path.join(test_out, "per_case.csv")) as f:
        return list(csv.DictReader(f)), minutes


def summarise_recipe(rows, minutes):
    """Means over the test cases of Dice and HD95 per region, and the minutes of every run."""
    mean = {metric: {r: float(np.mean([float(row[f"{r}_{metric}"]) for row in rows])) for r in REGIONS}
            for metric in ("dice", "hd95")}
    return {**mean, "cases": len(rows), "minutes": round(sum(minutes), 2), "minutes_per_run": minutes,
            "per_case": rows}


def format_recipe_table(results):
    lines = [f"{'recipe':<12}{'Dice WT':>9}{'TC':>7}{'ET':>7}{'HD95 WT':>10}{'TC':>7}{'ET':>7}{'cases':>7}{'minutes':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<12}" + "".join(f"{r['dice'][g]:>{w}.3f}" for g, w in zip(REGIONS, (9, 7, 7)))
                     + "".join(f"{r['hd95'][g]:>{w}.1f}" for g, w in zip(REGIONS, (10, 7, 7)))
                     + f"{r['cases']:>7}{r['minutes']:>9.1f}")
    return "\n".join(lines)


def run_recipes(pairs, recipes, folds, work):
    """Every recipe on every fold; returns the accuracy.json content."""
    cfg = check(build_config(pairs))
    if cfg.data.task != "brats":
        raise ValueError(f"data.task {cfg.data.task}: the accuracy benchmark scores the BraTS regions WT, TC, ET")
    if cfg.train.max_minutes <= 0:
        raise ValueError("--train.max_minutes: give the training budget in minutes (the same for every recipe)")
    paths = list_cases(os.path.abspath(cfg.data.dir))
    tests = patient_folds([case_id_of(p) for p in paths], folds, TEST_FRACTION, cfg.data.split_seed)
    passed = {k: v for k, v in pairs.items() if k not in FORCED}
    rows, minutes = {name: [] for name in recipes}, {name: [] for name in recipes}
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
            case_rows, used = train_and_test({**RECIPES[name], **passed}, train_dir, test_dir,
                                             os.path.join(fold_dir, name))
            rows[name] += case_rows
            minutes[name].append(round(used, 2))
    return {"data_dir": os.path.abspath(cfg.data.dir), "max_minutes": cfg.train.max_minutes, "folds": folds,
            "split_seed": cfg.data.split_seed, "test_sets": tests, "overrides": passed,
            "recipes": {name: {"keys": RECIPES[name], **summarise_recipe(rows[name], minutes[name])} for name in recipes}}


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                        help="recipe to train (repeat for several; default: all)")
    parser.add_argument("--folds", type=int, default=0, help="N folds over the patients (0: one ~30%% test set)")
    parser.add_argument("--work", default=os.path.join("runs", time.strftime("accuracy-%Y%m%d-%H%M%S")),
                        help="folder for the runs, their logs and accuracy.json")
    parser.add_argument("--out", default=None, help="where to write accuracy.json (default: WORK/accuracy.json)")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = os.path.abspath(args.work)
    try:
        result = run_recipes(pairs, list(dict.fromkeys(args.recipe or RECIPES)), args.folds, work)
    except (DataError, KeyError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    out = args.out or os.path.join(work, "accuracy.json")
    write_json(out, result)
    print(format_recipe_table(result["recipes"]))
    print(f"runs in {work}; figures in {out}")
    return result


if __name__ == "__main__":
    main()
