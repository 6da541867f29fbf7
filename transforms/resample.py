"""Resizing and resampling to another grid: trilinear for images, nearest for labels."""
import numpy as np
import torch
import torch.nn.functional as F


def resize_image(image, size):
    """Trilinear (bilinear in 2D) resize of (C, *spatial) to `size`."""
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(image[None].float(), size=tuple(size), mode=mode, align_corners=False)[0]


def resize_labels(mask, size):
    """Nearest-neighbour resize of a label map; 'nearest-exact' keeps voxel centres aligned."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0].to(mask.dtype)


def resampled_shape(shape, spacing, target):
    """The shape a grid of `shape` voxels at `spacing` mm takes at `target` mm (same field of view)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def target_spacing(native, target):
    """The spacing (mm) a case at `native` spacing is resampled to for data.spacing `target`: each axis
    at the target but never finer than its own; None when that is the native spacing or no target."""
    if not target:
        return None
    spacing = tuple(max(float(t), float(n)) for t, n in zip(target, native))
    return None if all(abs(s - float(n)) < 1e-6 for s, n in zip(spacing, native)) else spacing


def resample_image(image, spacing, target):
    """Trilinear resampling of a channel-first image (C, D, H, W) from `spacing` to `target` mm."""
    image = torch.as_tensor(image)
    return resize_image(image, resampled_shape(image.shape[1:], spacing, target))


def resample_labels(mask, spacing, target):
    """Nearest-neighbour resampling of a label map (D, H, W) from `spacing` to `target` mm."""
    mask = torch.as_tensor(np.asarray(mask))
    return resize_labels(mask, resampled_shape(mask.shape, spacing, target))


def resample_back(probs, native_shape):
    """Probabilities (R, *spatial) predicted on a resampled grid, back on the case's native grid
    (trilinear, before thresholding, so region borders fall between native voxels as they should)."""
    return resize_image(torch.as_tensor(probs), tuple(native_shape)).clamp_(0, 1)
