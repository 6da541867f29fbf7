"""Intensity normalisation: per-channel z-scores over the brain (non-zero voxels)."""
import numpy as np
import torch


def zscore(image, mean, std):
    """Per-channel z-score with given brain statistics (brain_stats below, or a file's brain_mean and
    brain_std); the background (0) stays 0. A float32 tensor, computed in float64 as the statistics are."""
    image = torch.as_tensor(image, dtype=torch.float32)
    view = (-1,) + (1,) * (image.dim() - 1)
    mean = torch.as_tensor(np.asarray(mean, np.float64)).reshape(view)
    std = torch.as_tensor(np.asarray(std, np.float64)).reshape(view).clamp_min(1e-8)
    return torch.where(image != 0, ((image - mean) / std).float(), torch.zeros((), dtype=torch.float32))


def zscore_brain(image):
    """Per-channel z-score over the image's own brain (non-zero voxels); the background stays 0."""
    image = torch.as_tensor(image, dtype=torch.float32)
    return zscore(image, *brain_stats(image.numpy()))


def brain_stats(image):
    """Per-channel mean and std over the brain (non-zero voxels) of a (C, *spatial) image: float64
    arrays of length C; a channel without brain gets (0, 1). Taken from sums, to which the background
    adds nothing: boolean indexing would copy the brain out first, several times slower."""
    means, stds = [], []
    for channel in np.asarray(image):
        count = np.count_nonzero(channel)
        values = channel.ravel().astype(np.float64)
        mean = values.sum() / count if count else 0.0
        means.append(mean)
        stds.append(np.sqrt(max(values @ values / count - mean ** 2, 0.0)) if count else 1.0)
    return np.asarray(means), np.asarray(stds)
