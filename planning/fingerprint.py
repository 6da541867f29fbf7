"""What the training cases look like, as the planner needs it: a plain dict."""
import numpy as np

from cases.h5 import read_case
from transforms.regions import labels_to_regions, task_regions


def case_fingerprint(case, regions):
    """Shape, spacing, per-channel brain intensity stats and region voxel counts of one Case."""
    brain = np.any(case.image != 0, axis=0)
    intensity = []
    for channel in case.image:  # over each channel's own non-zero voxels, as zscore_brain normalises
        values = channel[channel != 0].astype(np.float64)
        if values.size == 0:
            values = np.zeros(1)
        intensity.append({"mean": values.mean(), "std": values.std(),
                          "p00_5": np.percentile(values, 0.5), "p99_5": np.percentile(values, 99.5)})
    voxels = labels_to_regions(case.mask, regions).sum(dim=tuple(range(1, case.mask.ndim + 1))).tolist()
    return {"shape": list(case.image.shape[1:]), "spacing": list(case.spacing), "brain_voxels": int(brain.sum()),
            "intensity": intensity, "region_voxels": dict(zip(regions, voxels))}


def _median(values):
    return float(np.median(np.asarray(values, dtype=np.float64)))


def fingerprint(paths, fmt, task="brats"):
    """What the training cases look like, as a plain dict (deterministic for the same files):
    n_cases, median shape (brain-cropped, as stored) and spacing (mm, D/H/W), intensity stats of each
    channel over its non-zero voxels (medians over cases), median tumour voxels and share of the brain
    per region, how many cases lack each region, and the smallest region by median share."""
    if not paths:
        raise ValueError("fingerprint: no training cases")
    regions = task_regions(task)
    per_case = [case_fingerprint(read_case(path, fmt), regions) for path in sorted(paths)]
    shares = {r: [c["region_voxels"][r] / max(c["brain_voxels"], 1) for c in per_case] for r in regions}
    median_share = {r: _median(v) for r, v in shares.items()}
    smallest = min(regions, key=lambda r: (median_share[r], list(regions).index(r)))
    channels = len(per_case[0]["intensity"])
    return {
        "n_cases": len(per_case),
        "median_shape": [_median([c["shape"][a] for c in per_case]) for a in range(3)],
        "median_spacing": [_median([c["spacing"][a] for c in per_case]) for a in range(3)],
        "median_brain_voxels": _median([c["brain_voxels"] for c in per_case]),
        "intensity": [{stat: _median([c["intensity"][ch][stat] for c in per_case])
                       for stat in ("mean", "std", "p00_5", "p99_5")} for ch in range(channels)],
        "median_region_voxels": {r: _median([c["region_voxels"][r] for c in per_case]) for r in regions},
        "median_region_share": median_share,
        "cases_without_region": {r: sum(c["region_voxels"][r] == 0 for c in per_case) for r in regions},
        "smallest_region": {"name": smallest, "share": median_share[smallest]},
    }
