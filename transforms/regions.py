"""BraTS regions (WT/TC/ET) from label maps, and label maps from regions."""
import numpy as np
import torch

from config import TASK_REGIONS

REGIONS = TASK_REGIONS["brats"]  # BraTS evaluation regions WT/TC/ET, each a set of labels


def task_regions(task):
    """{region name: labels} of a data.task (config.check has validated the name)."""
    return TASK_REGIONS[task]


def labels_to_regions(mask, regions=REGIONS):
    """Label map (*spatial) -> float region channels (len(regions), *spatial): WT, TC, ET."""
    mask = torch.as_tensor(np.asarray(mask)).long()
    return torch.stack([torch.isin(mask, torch.tensor(labels)) for labels in regions.values()]).float()


def regions_to_labels(regions, enhancing_label=4):
    """Binary WT/TC/ET channels -> BraTS label map: ET -> 4, TC without ET -> 1, WT without TC -> 2.

    Nested by construction, so an ET voxel outside the predicted TC still counts as ET (as in BraTS
    post-processing, the more specific region wins).
    """
    wt, tc, et = (torch.as_tensor(r).bool() for r in regions)
    labels = torch.zeros(wt.shape, dtype=torch.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = enhancing_label
    return labels
