"""Synthetic BraTS-like cases, so a new user can run the whole pipeline without downloading data.

Each case is a skull-stripped "brain" (an irregular ellipsoid with white matter, a grey-matter
cortex and deep nuclei, CSF in ventricles, sulci and the midline fissure) holding one tumour:
edema (label 2) around a core of necrosis (1) inside an irregular enhancing rim (4). Intensities
follow rough MRI contrasts per channel (flair, t1, t1ce, t2), blurred by partial volume and
disturbed by per-case scale/offset, a smooth bias field and noise, so a network has to combine
channels and context instead of thresholding one channel.
"""
import logging
import os

import numpy as np
from scipy import ndimage

from cases.h5 import write_case

log = logging.getLogger(__name__)

# Mean intensity of each tissue per channel (flair, t1, t1ce, t2) before per-case scaling.
# Rows are indexed by the tissue codes below. Some gaps (edema vs grey matter in T1 and T1ce)
# are about one NOISE std, so no single channel separates tumour from brain.
BACKGROUND, WHITE, GREY, CSF, EDEMA, NECROSIS, ENHANCING = range(7)
TISSUE_INTENSITY = np.array([
    (0.00, 0.00, 0.00, 0.00),  # background: exactly zero, as after skull stripping
    (0.55, 0.80, 0.78, 0.45),  # white matter
    (0.66, 0.62, 0.62, 0.62),  # grey matter
    (0.15, 0.22, 0.22, 1.00),  # CSF: dark except in T2
    (0.86, 0.56, 0.58, 0.85),  # edema: bright in FLAIR and T2
    (0.74, 0.38, 0.32, 0.92),  # necrosis / non-enhancing core: dark in T1 and T1ce
    (0.80, 0.58, 1.25, 0.72),  # enhancing tumour: very bright in T1ce
], dtype=np.float32)
NOISE = 0.07               # Gaussian noise std relative to a tissue intensity of 1
NO_ENHANCING_EVERY = 5     # every 5th generated case has no enhancing tumour, like many low-grade gliomas


def smooth_field(rng, shape, knots):
    """Smooth random field with mean about 0 and std about 1; `knots` per axis sets how wavy it is.

    A sum of Gaussian bumps with random weights on a coarse knots^3 grid, expanded one axis at a
    time by matrix products: far faster than filtering full-size noise, and just as smooth.
    """
    bumps = []
    for n in shape:
        centres = np.linspace(-0.5, n - 0.5, knots, dtype=np.float32)
        width = centres[1] - centres[0]  # bumps as wide as their spacing overlap into a smooth surface
        bumps.append(np.exp(-0.5 * ((np.arange(n, dtype=np.float32)[:, None] - centres) / width) ** 2))
    field = rng.standard_normal((knots,) * 3).astype(np.float32)
    field = (bumps[0] @ field.reshape(knots, -1)).reshape(shape[0], knots, knots)
    field = (bumps[1] @ field) @ bumps[2].T  # (D, H, knots) then (D, H, W), contiguous
    sample = field[::3, ::3, ::3]  # statistics from every 27th voxel are plenty for a smooth field
    mean, std = sample.mean(), sample.std()
    field -= mean
    field /= std
    return field


def _grid(shape):
    """Broadcastable coordinates running from -1 to 1 along each axis."""
    return [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
            for axis, n in enumerate(shape)]


def _distance(shape, centre):
    """Euclidean distance in voxels from `centre`, for every voxel."""
    axes = [np.arange(n, dtype=np.float32).reshape([-1 if i == axis else 1 for i in range(3)]) - c
            for axis, (n, c) in enumerate(zip(shape, centre))]
    return np.sqrt(axes[0] ** 2 + axes[1] ** 2 + axes[2] ** 2)


def _brain(rng, shape):
    """Return the brain mask and a normalised radius: 0 at the centre, 1 on the (wavy) brain surface."""
    z, y, x = _grid(shape)
    radii = rng.uniform(0.84, 0.93, 3)
    radius = np.sqrt((z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2)
    radius = radius / (1 + 0.06 * smooth_field(rng, shape, 4) + 0.03 * smooth_field(rng, shape, 9))
    return radius < 1, radius


def _anatomy(rng, shape, brain, radius):
    """Tissue code per voxel: white matter, grey cortex and nuclei, CSF in ventricles, sulci, fissure."""
    z, y, x = _grid(shape)
    tissue = np.where(brain, WHITE, BACKGROUND).astype(np.uint8)
    cortex = radius > 0.86 + 0.04 * smooth_field(rng, shape, 8)
    nuclei = smooth_field(rng, shape, 7) > 1.6
    tissue[brain & (cortex | nuclei)] = GREY
    # Sulci: the zero level set of a smooth field is a set of thin wavy sheets, like folds.
    sulci = cortex & (np.abs(smooth_field(rng, shape, 12)) < 0.12)
    # The fissure between the hemispheres, front and back of the ventricles.
    fissure = (np.abs(x + 0.03 * smooth_field(rng, shape, 5)) < 0.02) & (radius > 0.5)
    # Lateral ventricles: two crescents either side of the midline, diverging towards the front.
    wobble = smooth_field(rng, shape, 6)
    ventricles = (z / 0.22) ** 2 + (y / 0.4) ** 2 + ((np.abs(x) - 0.08 - 0.12 * (y + 0.3) ** 2) / 0.05) ** 2
    ventricles = (ventricles < 1 + 0.4 * wobble) & (np.abs(x) > 0.02)  # septum between them
    tissue[brain & (sulci | fissure | ventricles)] = CSF
    return tissue


def _tumour(rng, shape, brain, radius, tissue, with_enhancing):
    """BraTS label map of one irregular tumour placed at a random spot inside the brain."""
    inside = np.flatnonzero(brain & (radius < 0.6))
    centre = np.unravel_index(rng.choice(inside), shape)
    brain_radius = (3 * brain.sum() / (4 * np.pi)) ** (1 / 3)
    # Log-uniform size: after the wavy edema spreads, the whole tumour is ~1% to ~10% of the brain.
    size = brain_radius * np.exp(rng.uniform(np.log(0.005), np.log(0.05))) ** (1 / 3)
    distance = _distance(shape, centre)
    # Edema: a wavy ball that reaches further along white matter, as it does in real gliomas.
    # Boundary waviness scales with the tumour: a few bumps around it whatever its size.
    knots = int(np.clip(2.5 * max(shape) / size, 6, 40))
    whole = distance < size * (1 + 0.35 * smooth_field(rng, shape, knots) + 0.25 * (tissue == WHITE))
    core_size = size * rng.uniform(0.4, 0.7)
    core_distance = _distance(shape, np.add(centre, rng.normal(0, 0.15 * size, 3)))
    core = (core_distance < core_size * (1 + 0.3 * smooth_field(rng, shape, knots))) | (distance <= 1.5)
    # Necrosis boundary is perturbed independently, so the enhancing rim varies in thickness.
    necrosis_size = core_size * rng.uniform(0.5, 0.85)
    necrosis = core_distance < necrosis_size * (1 + 0.4 * smooth_field(rng, shape, knots))
    whole, core = (whole | core) & brain, core & brain
    necrosis &= core
    if not necrosis.any() or not (core & ~necrosis).any():  # small core: a thin rim around a necrotic centre
        necrosis = ndimage.binary_erosion(core)
    mask = np.zeros(shape, np.uint8)
    mask[whole] = 2
    mask[core] = 4 if with_enhancing else 1
    mask[necrosis] = 1
    return mask


def _image(rng, tissue, mask, brain):
    """Four MRI-like channels from tissue codes and tumour labels."""
    code = tissue.copy()
    code[mask == 2], code[mask == 1], code[mask == 4] = EDEMA, NECROSIS, ENHANCING
    # Per-case contrast jitter: no two scans have quite the same tissue intensities.
    table = TISSUE_INTENSITY * rng.uniform(0.93, 1.07, TISSUE_INTENSITY.shape).astype(np.float32)
    image = np.take(table.T, code, axis=1)
    image *= 1 + 0.05 * smooth_field(rng, tissue.shape, 20)  # texture within each tissue
    image = ndimage.gaussian_filter(image, sigma=(0, 0.6, 0.6, 0.6), truncate=2.0)  # partial volume
    for channel in image:  # smooth multiplicative bias field, different in each scan
        channel *= np.exp(0.12 * smooth_field(rng, tissue.shape, 3))
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= NOISE
    image += noise
    image *= rng.uniform(250, 500, (4, 1, 1, 1)).astype(np.float32)  # per-channel global scale ...
    image += rng.uniform(0, 40, (4, 1, 1, 1)).astype(np.float32)  # ... and offset
    np.maximum(image, 1.0, out=image)  # positive inside the brain like raw MRI ...
    image *= brain  # ... and exactly zero outside
    return image


def make_case(rng: np.random.Generator, shape: tuple[int, int, int],
              with_enhancing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image float32 (4, D, H, W) in flair, t1, t1ce, t2 order; mask uint8 (D, H, W)."""
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape {shape}: need 3 sides of at least 16 voxels for a brain with a tumour")
    shape = tuple(int(s) for s in shape)
    brain, radius = _brain(rng, shape)
    tissue = _anatomy(rng, shape, brain, radius)
    mask = _tumour(rng, shape, brain, radius, tissue, with_enhancing)
    return _image(rng, tissue, mask, brain), mask


def generate_dataset(out_dir: str, n_cases: int = 40, seed: int = 0,
                     min_size: int = 72, max_size: int = 104) -> list[str]:
    """Write case_000.h5 ... into out_dir and return their paths; the same seed gives the same files.

    Each case draws its own shape (H, W in [min_size, max_size], D no larger, like real brains
    which are flatter top to bottom) from a generator seeded by (seed, case index), so the first
    cases do not change when n_cases does.
    """
    if not 16 <= min_size <= max_size:
        raise ValueError(f"min_size={min_size}, max_size={max_size}: need 16 <= min_size <= max_size")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for index in range(n_cases):
        rng = np.random.default_rng([seed, index])
        height, width = rng.integers(min_size, max_size + 1, 2)
        depth = rng.integers(min_size, min(height, width) + 1)
        with_enhancing = index % NO_ENHANCING_EVERY != NO_ENHANCING_EVERY - 1
        image, mask = make_case(rng, (depth, height, width), with_enhancing)
        paths.append(write_case(os.path.join(out_dir, f"case_{index:03d}.h5"), image, mask))
    log.info("wrote %d synthetic cases to %s (%d without enhancing tumour, seed %d)",
             n_cases, out_dir, n_cases // NO_ENHANCING_EVERY, seed)
    return paths
