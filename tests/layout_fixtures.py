"""Small fixtures in exactly the real layouts (file names, keys, dtypes), scaled down.

Each channel of a fixture holds its own intensity (CHANNEL_BASE), so a test can tell whether the
converter put every modality where it belongs.
"""
import os

import h5py
import numpy as np

CHANNEL_BASE = (100, 200, 300, 400)  # flair, t1, t1ce, t2 (project order)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 21.0], [0, 0, 1.5, 0], [0, 0, 0, 1]])
NAMING = {"2018": ("_", ("flair", "t1", "t1ce", "t2")), "2023": ("-", ("t2f", "t1n", "t1c", "t2w"))}


def ball(shape, centre, radius):
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((a - c) ** 2 for a, c in zip(axes, centre)) < radius ** 2


def volume_case(shape, seed=0, enhancing=4):
    """(image (4, *shape) int16 with zero background, labels (*shape) uint8: 2 edema, 1 core, `enhancing`)."""
    rng = np.random.default_rng(seed)
    centre = np.array(shape) / 2
    brain = ball(shape, centre, min(shape) * 0.4)
    tumour = centre + rng.integers(-1, 2, len(shape))
    labels = np.zeros(shape, np.uint8)
    labels[ball(shape, tumour, min(shape) * 0.25) & brain] = 2
    labels[ball(shape, tumour, min(shape) * 0.15) & brain] = enhancing
    labels[ball(shape, tumour, min(shape) * 0.07) & brain] = 1
    image = np.stack([np.where(brain, base + labels.astype(np.int16) * 10 + rng.integers(0, 5, shape), 0) for base in CHANNEL_BASE])
    return image.astype(np.int16), labels


def write_nifti_case(root, case, shape=(20, 22, 18), convention="2018", seg_name="seg", seed=0, labels=None):
    """<root>/<case>/<case>_{flair,...,seg}.nii.gz (2018) or <case>-{t2f,...,seg}.nii.gz (2023).

    shape is the NIfTI (X, Y, Z) shape; seg_name None writes no seg, any other name than 'seg' a
    differently named file (as BraTS20_Training_355 has). Returns (folder, image, labels) as written.
    """
    import nibabel as nib

    sep, names = NAMING[convention]
    folder = os.path.join(root, case)
    os.makedirs(folder, exist_ok=True)
    image, mask = volume_case(shape, seed, enhancing=4 if convention == "2018" else 3)
    mask = mask if labels is None else labels
    for name, channel in zip(names, image):
        nib.save(nib.Nifti1Image(channel, AFFINE), os.path.join(folder, f"{case}{sep}{name}.nii.gz"))
    if seg_name == "seg":
        nib.save(nib.Nifti1Image(mask, AFFINE), os.path.join(folder, f"{case}{sep}seg.nii.gz"))
    elif seg_name:
        nib.save(nib.Nifti1Image(mask, AFFINE), os.path.join(folder, seg_name))
    return folder, image, mask


def one_hot(labels):
    """Labels 1/2/4 -> (..., 3) uint8 NCR, ED, ET channels, as in the Kaggle slice files."""
    return np.stack([labels == 1, labels == 2, labels == 4], -1).astype(np.uint8)


def write_kaggle_volume(folder, volume, n_slices=12, size=24, seed=0):
    """volume_<v>_slice_<s>.h5 files: image (size, size, 4) float64, mask (size, size, 3) uint8.

    Every brain pixel of slice s holds s / 100 in its fraction, so the slice order can be checked.
    """
    os.makedirs(folder, exist_ok=True)
    image, labels = volume_case((n_slices, size, size), seed)
    for s in range(n_slices):
        with h5py.File(os.path.join(folder, f"volume_{volume}_slice_{s}.h5"), "w") as f:
            slice_image = np.moveaxis(image[:, s], 0, -1).astype(np.float64)
            f["image"] = np.where(slice_image > 0, slice_image + s / 100, 0)
            f["mask"] = one_hot(labels[s])
    return image, labels


def write_lgg_patient(root, patient, n_slices=12, size=32, seed=0):
    """kaggle_3m/<patient>/<patient>_<n>.tif (size, size, 3) uint8 + <patient>_<n>_mask.tif (0/255), n = 1..N."""
    import tifffile

    folder = os.path.join(root, "kaggle_3m", patient)
    os.makedirs(folder, exist_ok=True)
    image, labels = volume_case((n_slices, size, size), seed)
    for n in range(1, n_slices + 1):
        slice_image = np.moveaxis(image[:3, n - 1] // 2, 0, -1).astype(np.uint8)
        slice_image[0, 0] = n  # slice number in a corner pixel, to check the numeric order
        tifffile.imwrite(os.path.join(folder, f"{patient}_{n}.tif"), slice_image)
        tifffile.imwrite(os.path.join(folder, f"{patient}_{n}_mask.tif"),
                         np.where(labels[n - 1] > 0, 255, 0).astype(np.uint8))
    return folder


def write_generic_h5(path, shape=(16, 18, 20), seed=0, image_key="raw", mask_key="label"):
    """A user's own file: channel-last image (D, H, W, 4) under `raw`, labels 1/2/3 under `label`."""
    image, labels = volume_case(shape, seed, enhancing=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f[image_key] = np.moveaxis(image, 0, -1).astype(np.float32)
        f[mask_key] = labels
    return image, labels
