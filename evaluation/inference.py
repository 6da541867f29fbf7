"""Whole-case prediction at the case's native grid.

`predict_case` takes a raw image (C, *spatial) as stored and returns region probabilities
(R, *spatial) on the same grid, so scores and exported label maps are always at native resolution.
Resize mode predicts the whole volume resized to data.image_size; patch mode slides a window of
data.patch_size over the volume (`sliding_window`, a pure function over any predictor callable),
resampled to data.spacing first when that is coarser than the case's own and the probabilities
resampled back to the native grid;
slices mode predicts each axial slice with a 2D model, eval.batch_size slices at a time.
"""
import itertools
import math

import numpy as np
import torch

from cases.geometry import brain_box, uncrop
from runtime.precision import autocast
from transforms.context import slice_with_context
from transforms.normalise import zscore_brain
from transforms.resample import resample_back, resample_image, resize_image, target_spacing

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # window batches' layout, by dim


def gaussian_weights(window, sigma_scale=1 / 8, min_weight=1e-3):
    """Importance map of a window: a Gaussian of std window * sigma_scale, peak 1 at the centre.

    As in nnU-Net, voxels near a window's centre count more than its borders, where the network
    sees less context. Clamped below at `min_weight` so a voxel covered only by window borders
    still gets a finite, non-zero normaliser.
    """
    weights = torch.ones(())
    for size in window:
        centre, sigma = (size - 1) / 2, max(size * sigma_scale, 1e-6)
        axis = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float64) - centre) / sigma) ** 2)
        weights = weights[..., None] * axis
    weights = weights / weights.max()
    return weights.clamp_min(min_weight).float()


def window_starts(size, window, overlap):
    """Start offsets along one axis: evenly spaced, stride at most window * (1 - overlap), the
    last window ending exactly at the border (nnU-Net's layout). Assumes size >= window."""
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding-window overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(window * (1 - overlap)))
    steps = math.ceil((size - window) / stride) + 1
    if steps == 1:
        return [0]
    spacing = (size - window) / (steps - 1)
    return [round(i * spacing) for i in range(steps)]


def _flips(spatial_dims, mirror):
    """Axis sets to flip for test-time augmentation: none, or every subset of the spatial axes."""
    if not mirror:
        return [()]
    axes = [2 + a for a in range(spatial_dims)]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def _predict_batch(predictor, batch, flips, device):
    """Mean predictor output over the flips of a batch of windows (N, C, *window)."""
    batch = batch.to(device)
    total = None
    for axes in flips:
        out = predictor(batch.flip(axes) if axes else batch).float()
        out = out.flip(axes) if axes else out
        total = out if total is None else total + out
    return total / len(flips)


@torch.no_grad()
def sliding_window(predictor, image, window, overlap=0.5, batch_size=2, *, gaussian=True, mirror=False,
                   device=None):
    """Predict a whole volume (C, *spatial) window by window with `predictor`.

    predictor maps (N, C, *window) -> (N, R, *window) (logits or probabilities; they are averaged
    as they come). Volumes smaller than the window are zero-padded and cropped back. Windows are
    predicted `batch_size` at a time on `device` (default: the image's) and accumulated, weighted,
    on the image's device, so memory is the output map plus one batch, never all windows.
    With `mirror`, each batch is also predicted under every combination of axis flips.
    Returns (R, *spatial) float32 on the image's device.
    """
    image, window = torch.as_tensor(image, dtype=torch.float32), tuple(int(w) for w in window)
    spatial = tuple(image.shape[1:])
    if len(window) != len(spatial):
        raise ValueError(f"window {window} and image spatial shape {spatial} differ in dimensions")
    pad = [max(w - s, 0) for w, s in zip(window, spatial)]
    if any(pad):
        padding = [p for axis_pad in reversed(pad) for p in (axis_pad // 2, axis_pad - axis_pad // 2)]
        image = torch.nn.functional.pad(image, padding)
    padded = tuple(image.shape[1:])
    weights = (gaussian_weights(window) if gaussian else torch.ones(window)).to(image.device)
    starts = list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(padded, window))))
    flips, device = _flips(len(window), mirror), device or image.device
    output, norm = None, torch.zeros(padded, device=image.device)
    for first in range(0, len(starts), batch_size):
        boxes = [tuple(slice(o, o + w) for o, w in zip(start, window)) for start in starts[first:first + batch_size]]
        batch = torch.stack([image[(slice(None), *box)] for box in boxes])
        batch = batch.contiguous(memory_format=CHANNELS_LAST[batch.dim()])  # a bf16 forward 1.36x faster
        preds = _predict_batch(predictor, batch, flips, device).to(image.device)
        if output is None:
            output = torch.zeros((preds.shape[1], *padded), device=image.device)
        for pred, box in zip(preds, boxes):
            output[(slice(None), *box)] += pred * weights
            norm[box] += weights
    output /= norm
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    return output[(slice(None), *crop)].contiguous()


def model_predictor(model, device, amp_dtype=None):
    """The callable sliding_window needs: batch in, float logits out, autocast on CUDA when asked."""
    def predict(batch):
        with autocast(device, amp_dtype):
            return model(batch).float()
    return predict


@torch.no_grad()
def predict_case(model, image, cfg, device, amp_dtype=None, spacing=None):
    """Region probabilities (R, *spatial) at the native grid of a raw image (C, *spatial) whose voxels
    are `spacing` mm apart (needed in patch mode when data.spacing is set)."""
    model.eval()
    if cfg.data.mode == "patch":
        return predict_patches(model, image, cfg, device, amp_dtype, spacing)
    if cfg.data.mode == "slices":
        return predict_slices(model_predictor(model, device, amp_dtype), image, tuple(cfg.data.image_size)[-2:],
                              cfg.eval.batch_size, mirror=cfg.eval.mirror, device=device,
                              context=cfg.data.slice_context)
    native = tuple(image.shape[1:])
    x = resize_image(zscore_brain(image), tuple(cfg.data.image_size))[None].to(device)
    logits = _predict_batch(model_predictor(model, device, amp_dtype), x, _flips(len(native), cfg.eval.mirror),
                            device)
    probs = torch.sigmoid(logits)[0].cpu()
    return resize_image(probs, native).clamp_(0, 1)


def windows_per_pass(eval_cfg, device):
    """eval.sw_batch_size, with 0 (auto) resolved: 1 window per forward on a CPU, where a larger
    batch ran slower per window (docs/performance.md), 2 on a GPU."""
    if eval_cfg.sw_batch_size > 0:
        return eval_cfg.sw_batch_size
    return 2 if torch.device(device).type == "cuda" else 1


def predict_patches(model, image, cfg, device, amp_dtype, spacing):
    """Patch mode: the normalised image, cropped to its non-zero box (eval.crop_nonzero: as nnU-Net
    does, everything outside the brain is background, and a 240x240x155 scan holds ~2.5x more
    windows than its brain), resampled to data.spacing when that is coarser than `spacing`,
    predicted by a sliding window; probabilities brought back to the native grid, 0 outside the box."""
    if cfg.data.spacing and spacing is None:
        raise ValueError("predict_case: data.spacing is set, so the image's own spacing must be given")
    ev, target = cfg.eval, target_spacing(spacing or (), cfg.data.spacing)
    native = tuple(image.shape[1:])
    box = brain_box(np.asarray(image)) if ev.crop_nonzero else None  # the crop prepare_data.py makes
    image = zscore_brain(image if box is None else image[(slice(None), *(slice(*pair) for pair in box))])
    cropped = tuple(image.shape[1:])
    if target is not None:
        image = resample_image(image, spacing, target)
    logits = sliding_window(model_predictor(model, device, amp_dtype), image, tuple(cfg.data.patch_size),
                            ev.overlap, windows_per_pass(ev, device), gaussian=ev.gaussian, mirror=ev.mirror,
                            device=device)
    probs = torch.sigmoid(logits)
    probs = probs if target is None else resample_back(probs.cpu(), cropped)
    if box is None or cropped == native:
        return probs
    # back on the device the other paths return it on (a GPU run keeps its probabilities there)
    return torch.from_numpy(uncrop(probs.cpu().numpy(), box, native)).to(probs.device)


@torch.no_grad()
def predict_slices(predictor, image, size, batch_size=16, *, mirror=False, device=None, context=0):
    """Probabilities (R, D, H, W) of a raw volume (C, D, H, W), slice by slice with a 2D predictor.

    The volume is z-scored over its whole brain (as in training), each slice resized to `size`
    (h, w), stacked with `context` neighbours on each side as the training samples are
    (transforms.context.slice_with_context), predicted `batch_size` slices at a time, and the
    probabilities resized back to the native (H, W), so scores are counted on the source pixels.
    """
    image = zscore_brain(image)
    depth, native = image.shape[1], tuple(image.shape[2:])
    if native != tuple(size):  # the slices as a batch (D, C, H, W), resized, back to (C, D, h, w)
        image = torch.nn.functional.interpolate(image.transpose(0, 1), size=tuple(size), mode="bilinear",
                                                align_corners=False).transpose(0, 1)
    flips, device, step = _flips(2, mirror), device or image.device, max(1, batch_size)
    probs = []
    for first in range(0, depth, step):
        batch = torch.stack([slice_with_context(image, z, context) for z in range(first, min(first + step, depth))])
        probs.append(torch.sigmoid(_predict_batch(predictor, batch, flips, device)).cpu())
    probs = torch.cat(probs)
    if native != tuple(size):
        probs = torch.nn.functional.interpolate(probs, size=native, mode="bilinear", align_corners=False)
    return probs.transpose(0, 1).clamp_(0, 1).contiguous()
