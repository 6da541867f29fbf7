"""Which cases a run uses: the case files of a folder, checked once, split per case (patient).

The split is a pure function of the sorted case ids and data.split_seed, so every rank of a
distributed run computes the same one and a run's split.json can be recomputed from its config.
"""
import glob
import os

import numpy as np

from cases import DataError, read_case


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


def split_cases(case_ids, val_fraction, test_fraction, seed):
    """Deterministic per-case split: {'train': [...], 'val': [...], 'test': [...]}, no id in two parts."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, round(len(ids) * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    if n_test + n_val >= len(ids):
        raise DataError(f"{len(ids)} cases are too few to hold out {n_val} for validation and {n_test} for "
                        f"test; lower data.val_fraction / data.test_fraction or add cases")
    shuffled = [ids[i] for i in order]
    return {"test": sorted(shuffled[:n_test]), "val": sorted(shuffled[n_test:n_test + n_val]),
            "train": sorted(shuffled[n_test + n_val:])}
