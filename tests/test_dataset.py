"""The Dataset of each data.mode: what a sample holds, where a patch comes from, what is cached,
and that every sample is a pure function of (seed, epoch, index)."""
import h5py
import numpy as np
import pytest
import torch

from cases.h5 import write_case
from cases.splits import list_cases
from config import DataConfig
from dataset import PatchDataset, ResizeDataset, SliceDataset, build_dataset, patch_start
from transforms.normalise import zscore_brain


def data_cfg(**changes):
    cfg = DataConfig()
    cfg.image_size, cfg.patch_size, cfg.augment = (8, 8, 8), (8, 8, 8), False
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


@pytest.mark.parametrize("mode, kind, shape", [
    ("resize", ResizeDataset, (8, 8, 8)), ("patch", PatchDataset, (8, 8, 8)), ("slices", SliceDataset, (8, 8))])
def test_build_dataset_serves_the_mode_s_samples(tiny_dataset, mode, kind, shape):
    paths = list_cases(tiny_dataset)[:2]
    ds = build_dataset(data_cfg(mode=mode, slices_per_case=3), paths, seed=0)
    assert type(ds) is kind
    sample = ds[len(ds) - 1]
    assert sample["image"].shape == (4, *shape) and sample["target"].shape == (3, *shape)
    assert sample["image"].dtype == sample["target"].dtype == torch.float32
    assert sample["case_id"] == "case_001"


def test_samples_are_a_pure_function_of_seed_epoch_and_index(tiny_dataset):
    paths = list_cases(tiny_dataset)[:2]
    cfg = data_cfg(augment=True, flip_prob=0.5, rotate_prob=1.0)

    def image(seed, epoch, index, cache_gb=2.0):
        ds = ResizeDataset(paths, data_cfg(**{**vars(cfg), "cache_gb": cache_gb}), seed=seed)
        ds.set_epoch(epoch)
        return ds[index]["image"]
    first = image(0, 1, 1)
    assert torch.equal(first, image(0, 1, 1, cache_gb=0.0))  # the cache changes nothing
    assert not torch.equal(first, image(0, 2, 1)) and not torch.equal(first, image(1, 1, 1))


def test_the_cache_keeps_prepared_cases_up_to_cache_gb(tiny_dataset):
    paths = list_cases(tiny_dataset)[:3]
    ds = ResizeDataset(paths, data_cfg())
    for index in range(3):
        ds[index]
    assert sorted(ds.cache) == [0, 1, 2] and ds.cached_bytes == 3 * (4 * 4 + 1) * 8 ** 3  # float32 image, uint8 mask
    one_case = ResizeDataset(paths, data_cfg(cache_gb=ds.cached_bytes / 3 / 2 ** 30))
    for index in range(3):
        one_case[index]
    assert list(one_case.cache) == [0]
    assert torch.equal(one_case[2]["image"], ds[2]["image"])


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


def test_patch_start_is_a_pure_function_of_the_generator():
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
    ds = PatchDataset([path], data_cfg(foreground_fraction=1.0, patches_per_case=3), seed=0)
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


def test_one_hot_masks_are_refused_in_patch_mode_with_a_clear_error(tmp_path):
    path = str(tmp_path / "onehot.h5")
    with h5py.File(path, "w") as f:
        f["image"] = np.ones((4, 10, 10, 10), np.float32)
        f["mask"] = np.zeros((3, 10, 10, 10), np.uint8)
    with pytest.raises(ValueError, match="onehot.h5.*label-map"):
        PatchDataset([path], data_cfg())[0]


def test_slices_train_on_tumour_slices_of_each_case_in_turn(tiny_dataset):
    paths = list_cases(tiny_dataset)[:2]
    cfg = data_cfg(mode="slices", slices_per_case=4, foreground_fraction=1.0)
    train = SliceDataset(paths, cfg, seed=0)
    assert len(train) == 8 and all(train[i]["target"].any() for i in range(len(train)))
    assert [train[i]["case_id"] for i in range(len(train))] == ["case_000"] * 4 + ["case_001"] * 4
    assert len(SliceDataset(paths, data_cfg(mode="slices", slices_per_case=0))) == 40  # 0: every slice, 20 a case


def test_patches_at_a_coarser_spacing_come_from_the_case_resampled_once(tmp_path):
    from conftest import blob_case
    from transforms.resample import resampled_shape
    image, mask = blob_case(np.random.default_rng(0), (20, 24, 22))
    path = write_case(str(tmp_path / "c.h5"), image, mask, spacing=(1.0, 1.0, 2.0))
    cfg = DataConfig(mode="patch", patch_size=(8, 8, 8), spacing=(2.0, 2.0, 2.0), augment=False)
    ds = PatchDataset([path], cfg)
    sample = ds[0]
    assert sample["image"].shape == (4, 8, 8, 8) and sample["target"].shape == (3, 8, 8, 8)
    resampled, labels, points, _ = ds.cache[0]  # prepared once, kept within data.cache_gb
    assert resampled.shape[1:] == labels.shape == resampled_shape((20, 24, 22), (1, 1, 2), (2, 2, 2)) == (10, 12, 22)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 4} and len(points) == int((labels > 0).sum())
    assert ds.target(0) == (2.0, 2.0, 2.0)
    assert PatchDataset([path], DataConfig(mode="patch", spacing=(1.0, 1.0, 1.0))).target(0) is None
