"""One case on disk: the configured reading format, validated reads of other layouts, hyperslab
reads, and the brain statistics every normalisation uses."""
import h5py
import numpy as np
import pytest

from cases.h5 import DataError, case_format, image_layout, read_box, read_case, write_case
from config import DataConfig
from transforms.normalise import brain_stats


def data_cfg(**changes):
    cfg = DataConfig()
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return str(path)


@pytest.mark.parametrize("task, labels", [("brats", (0, 1, 2, 4)), ("binary", (0, 1))])
def test_case_format_follows_the_config(task, labels):
    fmt = case_format(data_cfg(task=task, image_key="raw", mask_key="label", channels=3, channel_last="true",
                               label_map="3:4, 5:2"))
    assert (fmt.image_key, fmt.mask_key, fmt.channels, fmt.channel_last) == ("raw", "label", 3, "true")
    assert fmt.label_map == {3: 4, 5: 2} and fmt.labels == labels


def test_case_format_refuses_a_malformed_label_map():
    with pytest.raises(ValueError, match="data.label_map '3-4'"):
        case_format(data_cfg(label_map="3-4"))


def test_other_layouts_read_as_the_project_layout(tmp_path):
    """Other key names, a channel-last image and BraTS 2023 labels, read through the config's format."""
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 2, (4, 5, 6, 7)).astype(np.float32)
    labels = rng.choice([0, 1, 2, 3], (5, 6, 7)).astype(np.uint8)
    path = write_h5(tmp_path / "other.h5", raw=np.moveaxis(image, 0, -1), label=labels)
    case = read_case(path, case_format(data_cfg(image_key="raw", mask_key="label", label_map="3:4")))
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.mask, np.where(labels == 3, 4, labels))
    assert case.case_id == "other"


@pytest.mark.parametrize("layout", ["first", "last", "first-with-background", "last-with-background"])
def test_one_hot_masks_read_as_labels_1_2_4(tmp_path, layout):
    """A one-hot NCR/ED/ET mask (as Kaggle's BraTS slices store it), channel-first or channel-last,
    with or without a background channel, reads as the label map it encodes (written out by hand)."""
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:4, 1:5, 1:6] = 2
    labels[2:4, 2:4, 2:5] = 1
    labels[2, 2:4, 3:5] = 4
    channels = [labels == 1, labels == 2, labels == 4]
    if layout.endswith("background"):
        channels.insert(0, labels == 0)
    hot = np.stack(channels).astype(np.uint8)
    mask = np.moveaxis(hot, 0, -1) if layout.startswith("last") else hot
    path = write_h5(tmp_path / "hot.h5", image=np.ones((4, 5, 6, 7), np.float32), mask=mask)
    case = read_case(path)
    assert case.mask.dtype == np.uint8 and case.mask.shape == (5, 6, 7)
    np.testing.assert_array_equal(case.mask, labels)
    assert sorted(np.unique(case.mask).tolist()) == [0, 1, 2, 4]


def test_one_hot_masks_with_overlapping_channels_are_refused(tmp_path):
    hot = np.zeros((3, 5, 6, 7), np.uint8)
    hot[0, 1:3, 1:3, 1:3] = hot[2, 2:4, 2:4, 2:4] = 1           # NCR and ET share 1 voxel
    path = write_h5(tmp_path / "overlap.h5", image=np.ones((4, 5, 6, 7), np.float32), mask=hot)
    with pytest.raises(DataError, match=r"overlap.h5: one-hot mask channels overlap in 1 voxels"):
        read_case(path)


def test_binary_task_refuses_brats_labels_naming_the_file(tmp_path):
    path = write_h5(tmp_path / "p.h5", image=np.ones((4, 5, 5, 5), np.float32), mask=np.full((5, 5, 5), 2, np.uint8))
    with pytest.raises(DataError, match=r"p.h5: mask has label values \[2\] outside \[0, 1\]"):
        read_case(path, case_format(data_cfg(task="binary")))


def test_image_layout_reads_the_channel_axis_from_the_shape(tmp_path):
    fmt = case_format(data_cfg())
    with h5py.File(tmp_path / "x.h5", "w") as f:
        assert image_layout(f.create_dataset("first", (4, 5, 6, 7), "f4"), "x.h5", fmt) == (0, (5, 6, 7))
        assert image_layout(f.create_dataset("last", (5, 6, 7, 4), "f4"), "x.h5", fmt) == (-1, (5, 6, 7))
        with pytest.raises(DataError, match="x.h5: image has 3 channels"):
            image_layout(f.create_dataset("three", (3, 5, 6, 7), "f4"), "x.h5", fmt)


def test_read_box_reads_a_hyperslab_and_pads_outside():
    data = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    with h5py.File("/dev/null", "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset("x", data=data)
        box = read_box(dset, (-2, 1, 3), (8, 4, 4), channel_axis=0)
        assert box.shape == (2, 8, 4, 4)
        np.testing.assert_array_equal(box[:, 2:7, :, :4], data[:, :, 1:5, 3:7])
        assert not box[:, :2].any() and not box[:, 7:].any()
        last = f.create_dataset("y", data=np.moveaxis(data, 0, -1))
        np.testing.assert_array_equal(read_box(last, (-2, 1, 3), (8, 4, 4), channel_axis=-1), np.moveaxis(box, 0, -1))
        mask = f.create_dataset("m", data=data[0])
        np.testing.assert_array_equal(read_box(mask, (-2, 1, 3), (8, 4, 4)), box[0])


def test_brain_stats_are_over_non_zero_voxels_per_channel():
    rng = np.random.default_rng(2)
    image = np.zeros((3, 9, 10, 11), np.float32)
    image[:2, 2:7, 3:8, 1:9] = rng.normal(300, 40, (2, 5, 5, 8))
    mean, std = brain_stats(image)
    for c in range(2):
        brain = image[c][image[c] != 0].astype(np.float64)
        assert mean[c] == pytest.approx(brain.mean(), rel=1e-12) and std[c] == pytest.approx(brain.std(), rel=1e-9)
    assert (mean[2], std[2]) == (0.0, 1.0)  # a channel without brain: nothing to scale
    assert mean.dtype == std.dtype == np.float64


def test_written_cases_carry_their_brain_stats(tmp_path):
    image = np.random.default_rng(0).uniform(0, 5, (4, 6, 7, 8)).astype(np.float32)
    image[:, :2] = 0
    path = write_case(str(tmp_path / "c.h5"), image, np.zeros((6, 7, 8), np.uint8))
    with h5py.File(path) as f:
        stored = f.attrs["brain_mean"], f.attrs["brain_std"]
    for kept, computed in zip(stored, brain_stats(image)):
        np.testing.assert_array_equal(kept, computed)
