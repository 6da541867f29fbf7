"""Pure functions on one case: normalisation, BraTS regions, resizing and augmentation.

Images are float tensors (C, *spatial); masks are label maps (*spatial). Spatial transforms take
the image and the mask together so they can never drift apart; labels are resampled with
nearest neighbour. Randomness comes only from the `torch.Generator` passed in.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from cases import brain_stats
from config import TASK_REGIONS

REGIONS = TASK_REGIONS["brats"]  # BraTS evaluation regions WT/TC/ET, each a set of labels


def task_regions(task):
    """{region name: labels} of a data.task (config.check has validated the name)."""
    return TASK_REGIONS[task]


def zscore(image, mean, std):
    """Per-channel z-score with given brain statistics (cases.brain_stats, or a file's brain_mean and
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


def resize_image(image, size):
    """Trilinear (bilinear in 2D) resize of (C, *spatial) to `size`."""
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(image[None].float(), size=tuple(size), mode=mode, align_corners=False)[0]


def resize_labels(mask, size):
    """Nearest-neighbour resize of a label map; 'nearest-exact' keeps voxel centres aligned."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0].to(mask.dtype)


def context_indices(depth, z, context):
    """Indices of slice z and `context` neighbours on each side, z - context .. z + context, clamped
    to [0, depth - 1]: at the volume's edges the edge slice repeats (there is nothing beyond it)."""
    return [min(max(z + offset, 0), depth - 1) for offset in range(-context, context + 1)]


def slice_with_context(volume, z, context):
    """Slice z of a volume (C, D, H, W) with its neighbours as extra channels (2.5D input):
    ((2 * context + 1) * C, H, W), ordered slice z - context .. z + context, each with its C
    channels (channel j * C + c is channel c of slice z - context + j); edges repeat the edge slice."""
    picked = volume[:, context_indices(volume.shape[1], z, context)]  # (C, 2k + 1, H, W)
    return picked.transpose(0, 1).reshape(-1, *volume.shape[2:])


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


def random_flip(image, mask, gen, prob):
    for axis in range(mask.dim()):
        if torch.rand((), generator=gen) < prob:
            image, mask = image.flip(axis + 1), mask.flip(axis)
    return image, mask


def random_rot90(image, mask, gen, prob):
    """A random number of quarter turns in the axial plane (the last two axes).

    A non-square plane only turns by 180 degrees, so every sample keeps the same shape for batching.
    """
    if torch.rand((), generator=gen) < prob:
        k = int(torch.randint(1, 4, (), generator=gen))
        if mask.shape[-1] != mask.shape[-2]:
            k = 2
        image, mask = image.rot90(k, dims=(-2, -1)), mask.rot90(k, dims=(-2, -1))
    return image, mask


def _rotation_matrix(angles):
    """Rotation about each axis in turn (3D), or one in-plane rotation (2D), as a torch matrix."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return torch.tensor([[c, -s], [s, c]])
    matrix = torch.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = torch.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = turn @ matrix
    return matrix


def random_rotate(image, mask, gen, prob, max_deg):
    """A small random rotation about the volume centre; image trilinear, labels nearest."""
    if torch.rand((), generator=gen) >= prob or max_deg <= 0:
        return image, mask
    n_angles = 1 if mask.dim() == 2 else 3
    angles = (torch.rand(n_angles, generator=gen) * 2 - 1) * math.radians(max_deg)
    matrix = _rotation_matrix(angles.tolist())
    theta = torch.cat([matrix, torch.zeros(matrix.shape[0], 1)], dim=1)[None]
    grid = F.affine_grid(theta, (1, 1, *mask.shape), align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0].to(mask.dtype)
    return image, mask


def random_zoom(image, mask, gen, prob, max_zoom):
    """Scale the content about the volume centre by a factor in [1 - max_zoom, 1 + max_zoom]
    (above 1 magnifies); the shape stays, image trilinear, labels nearest, zeros where it shrinks."""
    if max_zoom <= 0 or torch.rand((), generator=gen) >= prob:
        return image, mask
    factor = 1 + (float(torch.rand((), generator=gen)) * 2 - 1) * max_zoom
    dims = mask.dim()
    theta = torch.cat([torch.eye(dims) / factor, torch.zeros(dims, 1)], dim=1)[None]
    grid = F.affine_grid(theta, (1, 1, *mask.shape), align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(mask[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False)[0, 0].to(mask.dtype)
    return image, mask


def _uniform(gen, n, low, high):
    return low + torch.rand(n, generator=gen) * (high - low)


def random_intensity(image, gen, prob, scale, shift):
    """Per-channel brightness and contrast: x * s + t, s in [1 - scale, 1 + scale], t in [-shift, shift]."""
    if torch.rand((), generator=gen) >= prob:
        return image
    view = (-1,) + (1,) * (image.dim() - 1)
    s = _uniform(gen, image.shape[0], 1 - scale, 1 + scale).view(view)
    t = _uniform(gen, image.shape[0], -shift, shift).view(view)
    return image * s + t


def random_gamma(image, gen, prob, max_gamma):
    """x -> x ** gamma on each channel's own [min, max] range, mapped back to that range;
    gamma log-uniform in [1 / max_gamma, max_gamma], the same for every channel."""
    if max_gamma <= 1 or torch.rand((), generator=gen) >= prob:
        return image
    gamma = math.exp(float(_uniform(gen, 1, -math.log(max_gamma), math.log(max_gamma))))
    flat = image.reshape(image.shape[0], -1)
    low, high = flat.min(1).values, flat.max(1).values
    view = (-1,) + (1,) * (image.dim() - 1)
    low, span = low.view(view), (high - low).clamp_min(1e-8).view(view)
    return ((image - low) / span).clamp(0, 1) ** gamma * span + low


def random_noise(image, gen, prob, max_std):
    """Additive Gaussian noise of a std drawn from [0, max_std]."""
    if max_std <= 0 or torch.rand((), generator=gen) >= prob:
        return image
    std = float(torch.rand((), generator=gen)) * max_std
    return image + torch.randn(image.shape, generator=gen) * std


def augment(image, mask, gen, cfg):
    """Training augmentation (cfg: DataConfig); the same transform goes to image and mask, then
    intensity changes go to the image alone."""
    image, mask = random_flip(image, mask, gen, cfg.flip_prob)
    image, mask = random_rot90(image, mask, gen, cfg.rot90_prob)
    image, mask = random_rotate(image, mask, gen, cfg.rotate_prob, cfg.max_rotate_deg)
    image, mask = random_zoom(image, mask, gen, cfg.zoom_prob, cfg.max_zoom)
    image = random_intensity(image, gen, cfg.intensity_prob, cfg.intensity_scale, cfg.intensity_shift)
    image = random_gamma(image, gen, cfg.gamma_prob, cfg.max_gamma)
    image = random_noise(image, gen, cfg.noise_prob, cfg.noise_std)
    return image.contiguous(), mask.contiguous()
