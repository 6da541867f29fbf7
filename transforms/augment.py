"""Training augmentation: pure functions of (image, mask, generator)."""
import math

import torch
import torch.nn.functional as F


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


def random_missing_sequences(image, gen, prob, fill_channel, channels):
    """With probability prob, a random non-empty set of the sequences other than fill_channel becomes a
    copy of it, as a dataset hands over a case whose missing sequences it filled (Kaggle LGG fills with
    FLAIR). A 2.5D image holds one block of `channels` per slice: every slice loses the same sequences."""
    if fill_channel < 0 or prob <= 0 or torch.rand((), generator=gen) >= prob:
        return image
    lost = torch.rand(channels, generator=gen) < 0.5
    lost[fill_channel] = False
    if not lost.any():
        others = [c for c in range(channels) if c != fill_channel]
        lost[others[int(torch.randint(len(others), (), generator=gen))]] = True
    blocks = image.reshape(-1, channels, *image.shape[1:]).clone()
    blocks[:, lost] = blocks[:, fill_channel:fill_channel + 1].clone()
    return blocks.reshape(image.shape)


def augment(image, mask, gen, cfg):
    """Training augmentation (cfg: DataConfig); the same transform goes to image and mask, then
    intensity changes go to the image alone."""
    image = random_missing_sequences(image, gen, cfg.missing_prob, cfg.fill_channel, cfg.channels)
    image, mask = random_flip(image, mask, gen, cfg.flip_prob)
    image, mask = random_rot90(image, mask, gen, cfg.rot90_prob)
    image, mask = random_rotate(image, mask, gen, cfg.rotate_prob, cfg.max_rotate_deg)
    image, mask = random_zoom(image, mask, gen, cfg.zoom_prob, cfg.max_zoom)
    image = random_intensity(image, gen, cfg.intensity_prob, cfg.intensity_scale, cfg.intensity_shift)
    image = random_gamma(image, gen, cfg.gamma_prob, cfg.max_gamma)
    image = random_noise(image, gen, cfg.noise_prob, cfg.noise_std)
    return image.contiguous(), mask.contiguous()
