"""Patch mode: hyperslab reads, padding, the foreground-centred sampler and intensity augmentation."""
import h5py
import numpy as np
import pytest
import torch

from cases import write_case
from config import DataConfig
from dataset import CaseDataset, PatchDataset, build_datasets, patch_start, read_box
from transforms import augment, random_gamma, random_intensity, random_noise, random_zoom, zscore_brain


def data_cfg(**changes):
    cfg = DataConfig()
    cfg.patch_size, cfg.augment = (8, 8, 8), False
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def small_tumour_case(path, shape=(40, 36, 30), with_attrs=True):
    """A brain of random intensities with one 2x2x2 tumour in a corner, far from most patches."""
    rng = np.random.default_rng(1)
    image = rng.uniform(50, 150, (4, *shape)).astype(np.float32)
    image[:, :2] = 0  # some background
    mask = np.zeros(shape, np.uint8)
    mask[30:32, 3:5, 25:27] = 4
    write_case(path, image, mask)
    if not with_attrs:
        with h5py.File(path, "a") as f:
            del f.attrs["brain_mean"], f.attrs["brain_std"]
    return image, mask


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


@pytest.mark.parametrize("fraction", [0.0, 0.33, 1.0])
def test_foreground_fraction_holds_over_many_draws(fraction):
    shape, patch = (60, 50, 40), (16, 16, 16)
    foreground = np.array([[55, 2, 37], [54, 3, 36]])
    draws = 3000
    gen = torch.Generator().manual_seed(0)
    centred, containing = 0, 0
    for _ in range(draws):
        start, was_centred = patch_start(shape, patch, foreground, fraction, gen)
        assert all(min(0, s - w) <= o <= max(0, s - w) for o, s, w in zip(start, shape, patch))
        centred += was_centred
        inside = [all(o <= p < o + w for o, p, w in zip(start, point, patch)) for point in foreground]
        containing += any(inside)
        if was_centred:
            assert any(inside)
    sd = np.sqrt(fraction * (1 - fraction) / draws)
    assert abs(centred / draws - fraction) <= 4 * sd + 1e-9
    assert containing / draws >= fraction - 4 * sd  # random patches rarely reach the corner tumour


def test_sampler_is_a_pure_function_of_the_generator():
    draw = [patch_start((30, 30, 30), (8, 8, 8), np.array([[1, 2, 3]]), 0.5, torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert draw[0] == draw[1]


def test_no_foreground_means_uniform_patches():
    start, centred = patch_start((20, 20, 20), (8, 8, 8), np.zeros((0, 3)), 1.0, torch.Generator().manual_seed(0))
    assert not centred


@pytest.mark.parametrize("with_attrs", [True, False])
def test_patch_dataset_serves_normalised_aligned_patches(tmp_path, with_attrs):
    path = str(tmp_path / "case.h5")
    image, mask = small_tumour_case(path, with_attrs=with_attrs)
    ds = PatchDataset([path], data_cfg(foreground_fraction=1.0, patches_per_case=3), train=True, seed=0)
    assert len(ds) == 3
    whole = zscore_brain(image)
    for index in range(len(ds)):
        sample = ds[index]
        assert sample["image"].shape == (4, 8, 8, 8) and sample["target"].shape == (3, 8, 8, 8)
        assert sample["target"][2].sum() == 8  # centred on the tumour, and the tumour is whole
        # find where the patch came from by its mask and compare intensities with whole-volume zscore
        start, _ = patch_start(mask.shape, (8, 8, 8), ds._foreground[path], 1.0, ds.generator(index))
        box = tuple(slice(o, o + 8) for o in start)
        torch.testing.assert_close(sample["image"], whole[(slice(None), *box)], atol=2e-3, rtol=1e-3)
        assert torch.equal(sample["target"][0].bool(), torch.from_numpy(mask[box] > 0))
    assert ds[1]["image"].equal(ds[1]["image"])  # same index, same patch


def test_patches_are_padded_where_the_volume_is_smaller(tmp_path):
    path = str(tmp_path / "small.h5")
    image, mask = small_tumour_case(path, shape=(6, 36, 5))
    mask[:] = 0
    mask[2:4, 3:5, 1:3] = 4
    write_case(path, image, mask)
    sample = PatchDataset([path], data_cfg(patch_size=(16, 16, 16), foreground_fraction=1.0), seed=0)[0]
    assert sample["image"].shape == (4, 16, 16, 16)
    assert sample["target"][2].sum() == 8
    filled = sample["image"].abs().sum(0) > 0
    assert filled.any((1, 2)).sum() <= 6 and filled.any((0, 1)).sum() <= 5  # the rest is zero padding
    assert sample["image"].count_nonzero() == 4 * 4 * 16 * 5  # 4 channels x 4 brain slices x 16 rows x 5


def test_patch_mode_builds_patch_training_and_whole_case_validation(tiny_dataset):
    import glob
    paths = sorted(glob.glob(tiny_dataset + "/*.h5"))
    train_set, val_set = build_datasets(data_cfg(mode="patch"), paths[:4], paths[4:])
    assert isinstance(train_set, PatchDataset) and isinstance(val_set, CaseDataset)
    assert val_set[0]["image"].shape == (4, 20, 24, 22) and val_set[0]["target"].shape == (3, 20, 24, 22)
    with pytest.raises(ValueError, match="data.mode"):
        build_datasets(data_cfg(mode="tiles"), paths, paths)


def test_one_hot_masks_are_refused_in_patch_mode_with_a_clear_error(tmp_path):
    path = str(tmp_path / "onehot.h5")
    with h5py.File(path, "w") as f:
        f["image"] = np.ones((4, 10, 10, 10), np.float32)
        f["mask"] = np.zeros((3, 10, 10, 10), np.uint8)
    with pytest.raises(ValueError, match="onehot.h5.*label-map"):
        PatchDataset([path], data_cfg())[0]


def test_intensity_augmentations_change_only_values():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 8, 9, 10)
    scaled = random_intensity(image, gen, 1.0, 0.1, 0.1)
    ratio = (scaled[:, 0, 0, 0] - scaled[:, 1, 1, 1]) / (image[:, 0, 0, 0] - image[:, 1, 1, 1])
    assert ((ratio > 0.89) & (ratio < 1.11)).all()
    gamma = random_gamma(image, gen, 1.0, 1.5)
    for c in range(4):  # each channel keeps its range and its voxel order
        assert gamma[c].min() == pytest.approx(float(image[c].min()), abs=1e-5)
        assert gamma[c].max() == pytest.approx(float(image[c].max()), abs=1e-5)
        assert torch.equal(gamma[c].flatten().argsort(), image[c].flatten().argsort())
    noisy = random_noise(image, gen, 1.0, 0.1)
    assert 0 < float((noisy - image).std()) < 0.11
    assert torch.equal(random_noise(image, gen, 0.0, 0.1), image)


def test_zoom_keeps_image_and_mask_aligned():
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(20, 20, 20, dtype=torch.uint8)
    mask[6:14, 6:14, 6:14] = 1
    image = mask[None].float().repeat(2, 1, 1, 1) * 5
    zoomed_image, zoomed_mask = random_zoom(image, mask, gen, 1.0, 0.3)
    assert zoomed_mask.sum() != mask.sum()
    assert torch.equal((zoomed_image[0] > 2.5), zoomed_mask.bool()) or \
        ((zoomed_image[0] > 2.5) != zoomed_mask.bool()).float().mean() < 0.01


def test_full_augmentation_with_intensity_is_reproducible():
    cfg = data_cfg(augment=True, zoom_prob=1.0, intensity_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    image, mask = torch.randn(4, 8, 8, 8), torch.randint(0, 2, (8, 8, 8), dtype=torch.uint8)
    first = augment(image, mask, torch.Generator().manual_seed(5), cfg)
    second = augment(image, mask, torch.Generator().manual_seed(5), cfg)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
