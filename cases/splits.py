"""Which cases a run uses: the case files of a folder, checked once, split by patient.

The split is a pure function of the sorted case ids and data.split_seed, so every rank of a
distributed run computes the same one and a run's split.json can be recomputed from its config
(and whether the user set data.test_fraction: its "held_out" entry says).
A test split is taken when the user asks for one (sets data.test_fraction) or when the fraction holds
at least data.min_test_cases patients; otherwise every case outside validation trains, since a
test score from a handful of cases tells little and those cases train a better model.
Cases are grouped by patient (cases.patients.patient_id) before they are shuffled, so two scans of
one BraTS 2023+ patient never fall on two sides; a name without a patient part is its own group, so
a folder of such names splits exactly as its case ids would, and existing split.json files stay valid.
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


def _held(n, fraction):
    """Patients a fraction of `n` holds out: at least one when the fraction is above 0."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _counted(n_patients, n_cases):
    return f"{n_cases} cases" if n_patients == n_cases else f"{n_patients} patients ({n_cases} cases)"


def split_cases(case_ids, val_fraction, test_fraction, seed):
    """Deterministic split by patient: {'train': [...], 'val': [...], 'test': [...]} of case ids,
    no patient in two parts; the fractions count patients."""
    groups, order = _shuffled_patients(case_ids, seed)
    n = len(order)
    n_test, n_val = _held(n, test_fraction), _held(n, val_fraction)
    if n_test + n_val >= n:
        raise DataError(f"{_counted(n, len(case_ids))} are too few to hold out {n_val} for validation and "
                        f"{n_test} for test; lower data.val_fraction / data.test_fraction or add cases")
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


def take_test_split(case_ids, data_cfg, asked):
    """(the test fraction the split takes, why): data.test_fraction when the user set it (`asked`) or
    when it holds at least data.min_test_cases patients; else 0, and every non-validation case trains."""
    fraction, least = data_cfg.test_fraction, data_cfg.min_test_cases
    n = len(group_by_patient(sorted(case_ids)))
    counted, n_test = _counted(n, len(case_ids)), _held(n, fraction)
    if fraction <= 0:
        return 0.0, "no test split: data.test_fraction 0"
    if asked:
        return fraction, f"data.test_fraction {fraction:g} set by the user: {n_test} of {counted}"
    if n_test >= least:
        return fraction, f"{counted}: a {fraction:.0%} test split holds {n_test} (>= data.min_test_cases {least})"
    return 0.0, (f"no test split: {counted}, a {fraction:.0%} test split would hold {n_test} "
                 f"(< data.min_test_cases {least}); pass --data.test_fraction to take one")


def _val_reason(split, data_cfg):
    source = (f"fold {data_cfg.fold} of {data_cfg.folds}" if data_cfg.folds
              else f"data.val_fraction {data_cfg.val_fraction:g}")
    if not split["val"]:
        return (f"no validation ({source}): no postprocessing is chosen; best.pt holds the final weights "
                f"(poly/cosine) or follows the training loss (plateau)")
    return (f"{len(split['val'])} cases ({source}): they monitor training and choose the postprocessing "
            f"(and best.pt under the plateau schedule; poly/cosine ship the final weights)")


def make_split(case_ids, data_cfg, *, test_asked=False):
    """The split a run trains on: split_cases, or with data.folds fold data.fold (an int) of the
    cross-validation, its validation part that fold and its training part the other folds; the test
    part follows take_test_split (`test_asked`: the user set data.test_fraction). Its "held_out" entry
    says why each part was held out."""
    fraction, test_why = take_test_split(case_ids, data_cfg, test_asked)
    if not data_cfg.folds:
        split = split_cases(case_ids, data_cfg.val_fraction, fraction, data_cfg.split_seed)
    elif data_cfg.fold == "all":
        raise ValueError("data.fold all is every fold in turn (main.run_folds); one run trains one fold")
    else:
        fold = int(data_cfg.fold)
        test, folds = fold_patients(case_ids, fraction, data_cfg.split_seed, data_cfg.folds)
        train = sorted(c for i, cases in enumerate(folds) if i != fold for c in cases)
        split = {"test": test, "val": folds[fold], "train": train}
    return {**split, "held_out": {"test": test_why, "val": _val_reason(split, data_cfg)}}


def describe_grouping(case_ids):
    """The 'grouping' entry of split.json: the rule, the counts, and every patient with several scans."""
    groups = group_by_patient(sorted(case_ids))
    return {"by": "patient", "rule": GROUPING_RULE, "patients": len(groups), "cases": len(case_ids),
            "multi_scan_patients": {p: cases for p, cases in sorted(groups.items()) if len(cases) > 1}}
