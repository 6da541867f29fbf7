"""Which cases a run uses: listing a folder, the split by patient, cross-validation folds, the up-front check
of every file."""
import re

import pytest

from cases.h5 import CaseFormat, DataError
from cases.patients import patient_id
from cases.splits import (
    PARTS,
    describe_grouping,
    fold_patients,
    list_cases,
    make_split,
    split_cases,
    take_test_split,
    validate_cases,
)
from config import DataConfig

IDS = [f"c{i:02d}" for i in range(10)]


def test_list_cases_returns_sorted_h5_files_only(tmp_path):
    for name in ("b.h5", "a.h5", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_cases(str(tmp_path)) == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]


@pytest.mark.parametrize("content, problem", [
    ([], "no .h5 case files found (empty)"), (["scan.nii.gz"], "no .h5 case files found (found e.g. ['scan.nii.gz'])")])
def test_list_cases_names_the_folder_and_what_it_holds(tmp_path, content, problem):
    for name in content:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{tmp_path}: {re.escape(problem)}"):
        list_cases(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        list_cases(str(tmp_path / "nowhere"))


def test_split_is_the_one_earlier_runs_saved():
    """split.json of existing runs must stay reproducible from (case ids, fractions, seed)."""
    assert split_cases(IDS, 0.2, 0.2, 0) == {"test": ["c04", "c06"], "val": ["c02", "c07"],
                                             "train": ["c00", "c01", "c03", "c05", "c08", "c09"]}
    assert split_cases(IDS, 0.0, 0.15, 3) == {"test": ["c06", "c09"], "val": [],
                                              "train": ["c00", "c01", "c02", "c03", "c04", "c05", "c07", "c08"]}


@pytest.mark.parametrize("n, val, test", [(3, 0.15, 0.15), (7, 0.3, 0.1), (40, 0.15, 0.15), (5, 0.0, 0.0)])
def test_split_parts_are_disjoint_cover_every_case_and_ignore_input_order(n, val, test):
    ids = [f"case{i}" for i in range(n)]
    split = split_cases(ids, val, test, seed=1)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert set().union(*parts) == set(ids) and sum(map(len, parts)) == n
    assert len(split["val"]) == (max(1, round(n * val)) if val else 0)
    assert split_cases(list(reversed(ids)), val, test, seed=1) == split


def test_split_refuses_too_few_cases_saying_what_to_change():
    with pytest.raises(DataError, match="2 cases are too few.*data.val_fraction"):
        split_cases(["a", "b"], 0.15, 0.15, 0)


def test_validate_cases_stops_at_the_first_bad_file(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    good = list_cases(tiny_dataset)
    validate_cases(good, CaseFormat())
    with pytest.raises(DataError, match=f"{bad}: cannot be read as HDF5"):
        validate_cases([*good, str(bad)], CaseFormat())


def test_two_scans_of_one_patient_fall_on_one_side():
    """BraTS 2023 names: every patient's scans stay together whatever the seed; split.json says how."""
    ids = [f"BraTS-GLI-{p:05d}-{s:03d}" for p in range(12) for s in range(1 + (p % 3 == 0))] + ["case_x"]
    for seed in range(20):
        split = split_cases(ids, 0.2, 0.2, seed)
        sides = {patient_id(c): part for part in PARTS for c in split[part]}
        assert sorted(c for part in PARTS for c in split[part]) == sorted(ids)
        assert all(sides[patient_id(c)] == part for part in PARTS for c in split[part])
        assert len({patient_id(c) for c in split["test"]}) == round(13 * 0.2)  # fractions count patients
    grouping = describe_grouping(ids)
    assert grouping["patients"] == 13 and grouping["cases"] == 17
    assert grouping["multi_scan_patients"]["BraTS-GLI-00000"] == ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001"]


def test_names_without_a_patient_part_split_as_before_grouping():
    """Each such case is its own patient, so any earlier split.json is reproduced."""
    split = make_split(IDS, DataConfig(val_fraction=0.2, test_fraction=0.2), test_asked=True)
    assert {part: split[part] for part in PARTS} == split_cases(IDS, 0.2, 0.2, 0)
    assert split_cases(IDS, 0.2, 0.2, 0)["test"] == ["c04", "c06"]


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_folds_cover_the_non_test_patients_once_and_keep_the_plain_test_split(folds):
    ids = [f"BraTS-GLI-{p:05d}-{s:03d}" for p in range(14) for s in range(1 + (p % 4 == 0))]
    test, parts = fold_patients(ids, 0.15, 3, folds)
    assert test == split_cases(ids, 0.15, 0.15, 3)["test"] == split_cases(ids, 0.0, 0.15, 3)["test"]
    assert sorted(c for part in parts for c in part) == sorted(set(ids) - set(test))
    patients = [{patient_id(c) for c in part} for part in parts]
    assert sum(map(len, patients)) == len(set().union(*patients))  # no patient in two folds
    assert max(map(len, patients)) - min(map(len, patients)) <= 1
    for fold in range(folds):
        split = make_split(ids, DataConfig(test_fraction=0.15, split_seed=3, folds=folds, fold=str(fold)),
                           test_asked=True)
        assert split["val"] == parts[fold] and split["test"] == test
        assert sorted(split["train"]) == sorted(set(ids) - set(test) - set(parts[fold]))


def test_folds_refuse_too_few_patients():
    with pytest.raises(DataError, match="3 patients outside the test split are too few for data.folds 5"):
        fold_patients(["a", "b", "c", "d"], 0.25, 0, 5)


# ------------------------------------------------------------------------------ what is held out

@pytest.mark.parametrize("n, asked, min_test, test_cases", [
    (10, False, 10, 0),    # 15% of 10 is 2 < 10: no test split, every other case trains
    (10, True, 10, 2),     # the user set data.test_fraction: taken whatever its size
    (67, False, 10, 10),   # 15% of 67 is 10: large enough
    (60, False, 10, 0),    # 15% of 60 is 9
    (10, False, 2, 2),     # data.min_test_cases lowered
])
def test_a_test_split_is_taken_when_asked_for_or_large_enough(n, asked, min_test, test_cases):
    ids = [f"c{i:03d}" for i in range(n)]
    cfg = DataConfig(min_test_cases=min_test)
    split = make_split(ids, cfg, test_asked=asked)
    n_val = max(1, round(n * 0.15))
    assert len(split["test"]) == test_cases and len(split["val"]) == n_val
    assert len(split["train"]) == n - n_val - test_cases
    if test_cases:  # the same test split as before the rule existed
        assert {part: split[part] for part in PARTS} == split_cases(ids, 0.15, 0.15, 0)


def test_split_says_why_nothing_was_held_out_for_test():
    split = make_split(IDS, DataConfig())
    assert split["test"] == [] and len(split["train"]) == 8
    assert split["held_out"]["test"] == ("no test split: 10 cases, a 15% test split would hold 2 "
                                         "(< data.min_test_cases 10); pass --data.test_fraction to take one")
    assert split["held_out"]["val"].startswith("2 cases (data.val_fraction 0.15): they monitor training")
    assert "set by the user: 2 of 10 cases" in make_split(IDS, DataConfig(), test_asked=True)["held_out"]["test"]
    assert take_test_split(IDS, DataConfig(test_fraction=0.0), True) == (0.0, "no test split: data.test_fraction 0")


def test_the_rule_counts_patients_not_scans():
    """67 patients with 134 scans: 15% is 10 patients, a test split; 60 patients (120 scans) hold 9: none."""
    def scans(n):
        return [f"BraTS-GLI-{p:05d}-{s:03d}" for p in range(n) for s in range(2)]
    fraction, why = take_test_split(scans(67), DataConfig(), False)
    assert fraction == 0.15 and why.startswith("67 patients (134 cases): a 15% test split holds 10")
    assert take_test_split(scans(60), DataConfig(), False)[0] == 0.0


def test_folds_without_a_test_split_deal_every_patient():
    split = make_split(IDS, DataConfig(folds=5, fold="2"))
    assert split["test"] == [] and len(split["val"]) == 2 and len(split["train"]) == 8
    assert split["held_out"]["val"].startswith("2 cases (fold 2 of 5)")
