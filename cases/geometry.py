"""Where a stored case sits in its source scan: the brain box, un-cropping, the source's axis order."""
import numpy as np

from cases.h5 import DataError


def brain_box(image, mask=None):
    """[[start, stop]] per spatial axis of the voxels non-zero in any channel (or labelled in mask)."""
    occupied = np.any(image != 0, axis=0)
    if mask is not None:
        occupied |= mask != 0
    if not occupied.any():
        return None
    box = []
    for axis in range(occupied.ndim):
        hits = np.flatnonzero(occupied.any(axis=tuple(a for a in range(occupied.ndim) if a != axis)))
        box.append([int(hits[0]), int(hits[-1]) + 1])
    return box


def uncrop(array, crop_box, original_shape, fill=0):
    """Put an array cropped to `crop_box` (3 x [start, stop], last three axes) back into a zero
    (`fill`) array of `original_shape`: the inverse of the brain crop made at conversion."""
    box = [tuple(int(v) for v in pair) for pair in crop_box]
    original_shape = tuple(int(s) for s in original_shape)
    sizes = tuple(stop - start for start, stop in box)
    if sizes != tuple(array.shape[-3:]) or any(start < 0 or stop > s for (start, stop), s in zip(box, original_shape)):
        raise DataError(f"crop_box {box} does not fit an array of shape {tuple(array.shape)} inside "
                        f"original_shape {original_shape}; the case's attributes are inconsistent")
    out = np.full((*array.shape[:-3], *original_shape), fill, dtype=array.dtype)
    out[(..., *(slice(start, stop) for start, stop in box))] = array
    return out


def to_source_orientation(array, attrs):
    """Stored (..., D, H, W) -> the source NIfTI's (..., X, Y, Z) when the case came from NIfTI
    (attrs has an affine); unchanged otherwise."""
    if "affine" not in attrs:
        return array
    n = array.ndim
    return np.transpose(array, (*range(n - 3), n - 1, n - 2, n - 3))


def to_original_grid(array, attrs):
    """A stored-grid array (..., D, H, W) on the source's grid: un-cropped into original_shape when the
    case records a crop_box, then in the source's axis order."""
    if "crop_box" in attrs and "original_shape" in attrs:
        array = uncrop(array, attrs["crop_box"], attrs["original_shape"])
    return to_source_orientation(array, attrs)
