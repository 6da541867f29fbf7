"""Scored regions are those of the exported label map: nested, postprocessed in label space."""
import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from cases.h5 import Case
from config import Config
from evaluation.export import export_case
from evaluation.postprocess import (
    label_map_regions,
    relabel_small_enhancing,
    remove_minor_tumours,
    remove_unsure_tumours,
    to_label_map,
)
from transforms.regions import REGIONS, labels_to_regions

SHAPE = (7, 9, 11)
REGIONS_2023 = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def eval_cfg(et_min=0, largest=False):
    cfg = Config().eval
    cfg.postprocess_et_min, cfg.largest_component = et_min, largest
    return cfg


def channels():
    """WT a slab, TC a smaller slab inside it, and 3 ET voxels outside both."""
    regions = np.zeros((3, *SHAPE), bool)
    regions[0, 1:5, 1:6, 1:6] = True
    regions[1, 2:4, 2:4, 2:4] = True
    regions[2, 6, 8, 8:11] = True
    return regions


def test_enhancing_outside_whole_tumour_becomes_nested():
    pred = channels()
    out = label_map_regions(pred, "brats", eval_cfg())
    wt, tc, et = out
    assert (et == pred[2]).all()                               # ET wins, as in the label map
    assert (tc == (pred[1] | pred[2])).all() and (wt == (pred[0] | pred[2])).all()
    assert not (et & ~tc).any() and not (tc & ~wt).any()


def test_removed_small_enhancing_lands_in_core_and_whole_tumour():
    pred = channels()
    out = label_map_regions(pred, "brats", eval_cfg(et_min=4))     # 3 ET voxels < 4: necrosis
    assert not out[2].any()
    assert out[1][6, 8, 8:11].all() and out[0][6, 8, 8:11].all()
    assert out[0].sum() == pred[0].sum() + 3 and out[1].sum() == pred[1].sum() + 3
    kept = label_map_regions(pred, "brats", eval_cfg(et_min=3))    # 3 voxels are not below 3: kept
    assert kept[2].sum() == 3


def test_largest_component_keeps_one_tumour_with_all_its_labels():
    pred = channels()                                  # the slab (100 voxels) and the 3 ET voxels
    out = label_map_regions(pred, "brats", eval_cfg(largest=True))
    assert (out[0] == pred[0]).all() and (out[1] == pred[1]).all() and not out[2].any()


@pytest.mark.parametrize("largest", [False, True])
def test_binary_task_is_unchanged(largest):
    rng = np.random.default_rng(3)
    pred = rng.random((1, *SHAPE)) < 0.3
    out = label_map_regions(pred, "binary", eval_cfg(et_min=5, largest=largest))
    assert out.shape == pred.shape and out.dtype == bool
    components, count = ndimage.label(pred[0])
    biggest = components == 1 + np.bincount(components.ravel())[1:].argmax()
    assert (out[0] == (biggest if largest else pred[0])).all() and count > 1
    assert (to_label_map(pred, "binary") == pred[0]).all()


@pytest.mark.parametrize("et_voxels, threshold, kept", [(5, 10, False), (5, 5, True), (5, 0, True), (0, 10, True)])
def test_small_enhancing_tumour_becomes_necrosis(et_voxels, threshold, kept):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[:3], labels[:2] = 2, 1
    labels.reshape(-1)[:et_voxels] = 4
    out = relabel_small_enhancing(labels, threshold)
    assert (out == 4).sum() == (et_voxels if kept else 0)
    assert ((out > 0) == (labels > 0)).all() and (np.isin(out, (1, 4)) == np.isin(labels, (1, 4))).all()
    assert (labels == 4).sum() == et_voxels  # the input is left as it was


@pytest.mark.parametrize("seed, et_min, largest", [(0, 0, False), (1, 40, False), (2, 0, True), (3, 500, True)])
def test_round_trip_through_the_exported_label_map(seed, et_min, largest, tmp_path):
    rng = np.random.default_rng(seed)
    pred = rng.random((3, *SHAPE)) < [[[[0.5]]], [[[0.3]]], [[[0.1]]]]    # unnested noise
    cfg = eval_cfg(et_min, largest)
    regions = label_map_regions(pred, "brats", cfg)
    assert not (regions[2] & ~regions[1]).any() and not (regions[1] & ~regions[0]).any()
    case = Case("c", np.zeros((4, *SHAPE), np.float32), None)
    for enhancing, names in ((4, REGIONS), (3, REGIONS_2023)):
        out = str(tmp_path / f"et{enhancing}")
        written = export_case(out, case, regions, default_enhancing=enhancing, overlay=False)[0]
        with h5py.File(written) as f:                                     # what export writes
            exported = f["mask"][()]
        assert set(np.unique(exported)) <= {0, 1, 2, enhancing}
        assert (regions == (labels_to_regions(exported, names).numpy() > 0.5)).all()
    # the expectation built by hand from the raw channels: ET wins, TC takes ET in, WT takes both;
    # an ET of fewer than et_min voxels becomes necrosis, so it leaves ET and stays in TC and WT
    wt, tc, et = pred
    small = et_min and 0 < et.sum() < et_min
    expected = np.stack([wt | tc | et, tc | et, et & (not small)])
    if not largest:
        assert (regions == expected).all()
    else:                                               # one component of the tumour, with its labels
        assert not (regions & ~expected).any() and regions[0].any()


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="3 region channels"):
        to_label_map(np.zeros((2, *SHAPE), bool), "brats")


def two_components(fp_peak=0.6, tumour_peak=0.97):
    """A tumour of 8 voxels at probability `tumour_peak` and, far from it, a 27-voxel false positive
    whose probability stays at `fp_peak`: the larger component is the one the network doubts."""
    probs = np.zeros((1, *SHAPE), np.float32)
    probs[0, 1:3, 1:3, 1:3] = tumour_peak
    probs[0, 4:7, 5:8, 7:10] = fp_peak
    return probs


@pytest.mark.parametrize("max_voxels, min_peak, fp_kept", [
    (30, 0.9, False),    # the false positive is small and unsure: removed
    (27, 0.9, True),     # 27 voxels are not below 27: kept
    (30, 0.6, True),     # its peak 0.6 reaches 0.6: kept
    (0, 0.9, True), (30, 0.0, True),   # either key at 0: off
])
def test_an_unsure_component_goes_and_a_confident_tumour_stays(max_voxels, min_peak, fp_kept):
    probs = two_components()
    cfg = Config().eval
    cfg.unsure_component_voxels, cfg.unsure_component_peak = max_voxels, min_peak
    out = label_map_regions(probs > 0.5, "binary", cfg, probs)
    assert out[0, 1:3, 1:3, 1:3].all()                      # the tumour, 8 voxels < 30 but sure: kept
    assert out[0, 4:7, 5:8, 7:10].all() == fp_kept and out.sum() == 8 + 27 * fp_kept
    largest = label_map_regions(probs > 0.5, "binary", eval_cfg(largest=True))
    assert not largest[0, 1:3, 1:3, 1:3].any()              # keep-the-largest loses the tumour


def test_unsure_components_are_26_connected_and_judged_by_their_peak():
    probs = np.zeros((3, *SHAPE), np.float32)
    probs[0, 2:4, 2:4, 2:4] = 0.99                        # a sure tumour (WT)...
    probs[2, 4, 4, 4] = 0.6                               # ...with an unsure ET voxel touching it at a corner
    probs[1, 6, 8, 8] = 0.7                               # an unsure stray TC voxel alone
    labels = to_label_map(probs > 0.5, "brats")
    cfg = Config().eval
    cfg.unsure_component_voxels, cfg.unsure_component_peak = 5, 0.9
    out = remove_unsure_tumours(labels, probs, 5, 0.9)
    assert out[4, 4, 4] == 4 and out[6, 8, 8] == 0 and (out[2:4, 2:4, 2:4] == 2).all()
    assert (labels_to_regions(out).numpy() > 0.5).tolist() == label_map_regions(probs > 0.5, "brats", cfg,
                                                                                 torch.from_numpy(probs)).tolist()
    with pytest.raises(ValueError, match="needs the region probabilities"):
        label_map_regions(probs > 0.5, "brats", cfg)


def test_minor_components_are_judged_by_probability_mass_not_size():
    """A 100-voxel false positive the network doubts (0.55: mass 55) and an 8-voxel tumour it is sure
    of (0.99: mass 7.9, 14% of 55 though only 8% of the voxels): a 0.1 share keeps both; a 1-voxel
    confident stray (1.8% of the mass) goes at 0.02; the largest component always stays."""
    probs = np.zeros((1, 12, 12, 12), np.float32)
    probs[0, 0:4, 0:5, 0:5] = 0.55                       # the false positive, 100 voxels
    probs[0, 8:10, 8:10, 8:10] = 0.99                    # the tumour, 8 voxels
    probs[0, 11, 0, 11] = 0.99                           # a confident stray voxel
    labels = (probs[0] > 0.5).astype(np.uint8)
    kept = remove_minor_tumours(labels, probs, 0.1)
    assert kept[8:10, 8:10, 8:10].all() and kept[0:4, 0:5, 0:5].all() and not kept[11, 0, 11]
    assert remove_minor_tumours(labels, probs, 0.02)[8:10, 8:10, 8:10].all()
    assert remove_minor_tumours(labels, probs, 0.2)[0:4, 0:5, 0:5].all()   # the largest is never removed
    assert (remove_minor_tumours(labels, probs, 0) == labels).all()
    with pytest.raises(ValueError, match="needs the region probabilities"):
        remove_minor_tumours(labels, None, 0.1)
