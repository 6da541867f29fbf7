"""Which cases a run uses: listing a folder, the per-case split, the up-front check of every file."""
import re

import pytest

from cases import CaseFormat, DataError
from splits import list_cases, split_cases, validate_cases

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
