"""BraTS scoring: HD95 on hand-made shapes (in mm, anisotropic spacing) and the four empty cases."""
import numpy as np
import pytest
from scipy import ndimage

from evaluation.metrics import EMPTY_HD95, hd95, score_case


def cube(shape, corner, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def hd95_uncropped(pred, truth, spacing):
    """The definition, on the whole array: 95th percentile of symmetric surface distances."""
    structure = ndimage.generate_binary_structure(3, 1)
    surfaces = [m & ~ndimage.binary_erosion(m, structure) for m in (pred, truth)]
    to_truth = ndimage.distance_transform_edt(~surfaces[1], sampling=spacing)[surfaces[0]]
    to_pred = ndimage.distance_transform_edt(~surfaces[0], sampling=spacing)[surfaces[1]]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("axis, spacing", [(0, (1.0, 1.0, 1.0)), (1, (1.0, 1.0, 1.0)), (0, (2.5, 1.0, 1.0)),
                                           (2, (1.0, 0.5, 3.0)), (1, (1.0, 0.7, 1.0))])
def test_cubes_offset_by_k_voxels_are_k_voxel_lengths_apart(k, axis, spacing):
    corner = [6, 6, 6]
    truth = cube((30, 31, 29), corner, 10)
    corner[axis] += k
    pred = cube((30, 31, 29), corner, 10)
    assert hd95(pred, truth, spacing) == pytest.approx(k * spacing[axis])
    assert hd95(truth, pred, spacing) == pytest.approx(k * spacing[axis])


def test_bounding_box_crop_gives_the_same_answer_as_the_whole_array():
    rng = np.random.default_rng(0)
    truth = ndimage.binary_dilation(rng.random((40, 36, 30)) > 0.995, iterations=2)
    pred = ndimage.binary_dilation(rng.random((40, 36, 30)) > 0.995, iterations=2)
    truth[0:3, 0:4, 0:2] = True  # touching the array's border too
    for spacing in ((1.0, 1.0, 1.0), (3.0, 1.0, 0.5)):
        assert hd95(pred, truth, spacing) == pytest.approx(hd95_uncropped(pred, truth, spacing))


@pytest.mark.parametrize("pred_empty, truth_empty, dice, hd, sensitivity", [
    (True, True, 1.0, 0.0, 1.0),
    (True, False, 0.0, EMPTY_HD95, 0.0),
    (False, True, 0.0, EMPTY_HD95, 0.0),
    (False, False, 1.0, 0.0, 1.0)])
def test_the_four_empty_cases(pred_empty, truth_empty, dice, hd, sensitivity):
    some, none = cube((12, 12, 12), (3, 3, 3), 4), np.zeros((12, 12, 12), bool)
    pred, truth = (none if pred_empty else some), (none if truth_empty else some)
    scores = score_case(pred[None], truth[None], ["ET"], spacing=(1.0, 1.0, 2.0))["ET"]
    assert scores["dice"] == dice and scores["iou"] == dice
    assert scores["hd95"] == hd and scores["sensitivity"] == sensitivity
    assert set(scores) == {"dice", "iou", "sensitivity", "specificity", "hd95"}
