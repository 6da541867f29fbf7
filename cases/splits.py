"""Which cases a run uses: the case files of a folder, checked once, split by patient.

The split is a pure function of the sorted case ids and data.split_seed, so every rank of a
distributed run computes the same one and a run's split.json can be recomputed from its config.
Cases are grouped by patient (patients.patient_id) before they are shuffled, so two scans of one
BraTS 2023+ patient never fall on two sides; a name without a patient part is its own group, which
keeps the split of such names exactly what it was before grouping existed.
Cross-validation (data.folds K) holds out the same test patients as a plain split with that seed
and deals the other patients into K folds; fold i validates on fold i and trains on the rest.
"""
import glob
import os

import numpy as np

from cases.h5 import DataError, read_case
from cases.patients import group_by_patient

PARTS = ("train", "val", "test")  # the case lists of split.json; other entries describe them
GROUPING_RULE = ("patients.patient_id: BraTS-<cohort>-<patient>-<scan> names share their patient; "
                 "any other name is its own patient")


def list_cases(folder):
    """Sorted .h5 files in a folder; a clear error when there are none."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder does not exist")
    paths = sorted(glob.glob(os.path.join(folder, "*.h5")))
    if not paths:
        others = sorted(os.listdir(folder))[:5]
        raise DataError(f"{folder}: no .h5 case files found" + (f" (found e.g. {others})" if others else " (empty)"))
    return paths


def validate_cases(paths, fmt):
    """Read every case once before training, so a bad file stops the run before it starts."""
    for path in paths:
        read_case(path, fmt)


def _shuffled_patients(case_ids, seed):
    """{patient: [case ids]} of the sorted ids, and the patients in the seed's order."""
    groups = group_by_patient(sorted(case_ids))
    patients = sorted(groups)
    return groups, [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]


def _cases_of(groups, patients):
    return sorted(case for patient in patients for case in groups[patient])


def split_cases(case_ids, val_fraction, test_fraction, seed):
    """Deterministic split by patient: {'train': [...], 'val': [...], 'test': [...]} of case ids,
    no patient in two parts; the fractions count patients."""
    groups, order = _shuffled_patients(case_ids, seed)
    n = len(order)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n_test + n_val >= n:
        what = "cases" if n == len(case_ids) else f"patients ({len(case_ids)} cases)"
        raise DataError(f"{n} {what} are too few to hold out {n_val} for validation and {n_test} for "
                        f"test; lower data.val_fraction / data.test_fraction or add cases")
    return {"test": _cases_of(groups, order[:n_test]), "val": _cases_of(groups, order[n_test:n_test + n_val]),
            "train": _cases_of(groups, order[n_test + n_val:])}


def fold_patients(case_ids, test_fraction, seed, folds):
    """(test case ids, [case ids of fold 0, ..., fold K-1]): the test patients of
    split_cases(case_ids, 0, test_fraction, seed), the others dealt round-robin into `folds` folds
    in an order fixed by the seed."""
    test = split_cases(case_ids, 0.0, test_fraction, seed)["test"]
    groups, order = _shuffled_patients(set(case_ids) - set(test), [seed, folds])
    if len(order) < folds:
        raise DataError(f"{len(order)} patients outside the test split are too few for data.folds {folds}; "
                        f"lower data.folds or data.test_fraction")
    return test, [_cases_of(groups, order[i::folds]) for i in range(folds)]


def make_split(case_ids, data_cfg):
    """The split a run trains on: split_cases, or with data.folds fold data.fold (an int) of the
    cross-validation, its validation part that fold and its training part the other folds."""
    if not data_cfg.folds:
        return split_cases(case_ids, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed)
    if data_cfg.fold == "all":
        raise ValueError("data.fold all is every fold in turn (main.run_folds); one run trains one fold")
    fold = int(data_cfg.fold)
    test, folds = fold_patients(case_ids, data_cfg.test_fraction, data_cfg.split_seed, data_cfg.folds)
    train = sorted(c for i, cases in enumerate(folds) if i != fold for c in cases)
    return {"test": test, "val": folds[fold], "train": train}


def describe_grouping(case_ids):
    """The 'grouping' entry of split.json: the rule, the counts, and every patient with several scans."""
    groups = group_by_patient(sorted(case_ids))
    return {"by": "patient", "rule": GROUPING_RULE, "patients": len(groups), "cases": len(case_ids),
            "multi_scan_patients": {p: cases for p, cases in sorted(groups.items()) if len(cases) > 1}}
