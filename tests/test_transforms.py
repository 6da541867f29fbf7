import numpy as np
import pytest
import torch

from config import Config, DataConfig, check
from transforms.augment import (
    augment,
    random_flip,
    random_gamma,
    random_intensity,
    random_missing_sequences,
    random_noise,
    random_rot90,
    random_rotate,
    random_zoom,
)
from transforms.normalise import brain_stats, zscore, zscore_brain
from transforms.regions import labels_to_regions, regions_to_labels
from transforms.resample import resize_image, resize_labels


def labelled_volume(shape=(12, 16, 16), seed=0):
    """A mask of random blocks and an image whose first channel is the mask itself."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for label in (2, 1, 4):
        lo = rng.integers(0, np.array(shape) // 2)
        hi = lo + rng.integers(3, np.array(shape) // 2)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    mask = torch.from_numpy(mask)
    image = torch.stack([mask.float(), torch.rand(shape), torch.rand(shape)])
    return image, mask


@pytest.mark.parametrize("transform", [
    lambda i, m, g: random_flip(i, m, g, 1.0),
    lambda i, m, g: random_rot90(i, m, g, 1.0),
])
def test_exact_transforms_keep_image_and_mask_aligned(transform):
    for seed in range(6):
        image, mask = labelled_volume(seed=seed)
        out_image, out_mask = transform(image, mask, torch.Generator().manual_seed(seed))
        assert torch.equal(out_image[0], out_mask.float())


def test_rot90_of_a_non_square_plane_keeps_the_shape():
    image, mask = labelled_volume(shape=(8, 12, 16))
    for seed in range(6):
        out_image, out_mask = random_rot90(image, mask, torch.Generator().manual_seed(seed), 1.0)
        assert out_mask.shape == mask.shape and torch.equal(out_image[0], out_mask.float())


def test_small_rotation_keeps_image_and_mask_aligned():
    for seed in range(4):
        image, mask = labelled_volume(shape=(24, 24, 24), seed=seed)
        image = torch.stack([(mask > 0).float()])
        out_image, out_mask = random_rotate(image, mask, torch.Generator().manual_seed(seed), 1.0, 15.0)
        assert not torch.equal(out_mask, mask)  # it did rotate
        agreement = ((out_image[0] > 0.5) == (out_mask > 0)).float().mean()
        assert agreement > 0.98
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 4}  # nearest neighbour: no new labels


def test_full_augmentation_is_reproducible_and_aligned():
    cfg = DataConfig(flip_prob=0.5, rot90_prob=0.5, rotate_prob=0.0)
    image, mask = labelled_volume(shape=(16, 16, 16))
    a = augment(image, mask, torch.Generator().manual_seed(3), cfg)
    b = augment(image, mask, torch.Generator().manual_seed(3), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][0], a[1].float())


def test_2d_rotation():
    mask = torch.zeros(20, 20, dtype=torch.uint8)
    mask[5:12, 6:15] = 1
    image = mask[None].float()
    out_image, out_mask = random_rotate(image, mask, torch.Generator().manual_seed(0), 1.0, 20.0)
    assert ((out_image[0] > 0.5) == (out_mask > 0)).float().mean() > 0.97


def test_regions_from_labels():
    mask = torch.tensor([0, 1, 2, 4])
    regions = labels_to_regions(mask)
    assert regions.tolist() == [[0, 1, 1, 1],   # WT = {1, 2, 4}
                                [0, 1, 0, 1],   # TC = {1, 4}
                                [0, 0, 0, 1]]   # ET = {4}
    assert regions_to_labels(regions > 0).tolist() == [0, 1, 2, 4]
    assert regions_to_labels(regions > 0, enhancing_label=3).tolist() == [0, 1, 2, 3]


def test_zscore_over_brain_only():
    image = torch.zeros(2, 6, 6, 6)
    image[:, 1:5, 1:5, 1:5] = torch.rand(2, 4, 4, 4) * 100 + 50
    out = zscore_brain(image)
    brain = image[0] != 0
    assert torch.all(out[:, ~brain] == 0)
    assert out[0][brain].mean().abs() < 1e-5 and (out[0][brain].std(correction=0) - 1).abs() < 1e-4


def test_zscore_with_given_stats_is_the_one_normalisation():
    """A patch z-scored with its case's stored statistics equals that patch of the z-scored case."""
    image = np.zeros((3, 10, 9, 8), np.float32)
    image[:, 2:8] = np.random.default_rng(0).uniform(20, 400, (3, 6, 9, 8))
    patch = (slice(None), slice(1, 6), slice(2, 7), slice(0, 4))
    assert torch.equal(zscore(image[patch], *brain_stats(image)), zscore_brain(image)[patch])
    assert zscore(image[patch], *brain_stats(image)).dtype == torch.float32
    flat = zscore(np.ones((1, 2, 2, 2), np.float32), [1.0], [0.0])  # zero std: clamped, not a division by 0
    assert torch.isfinite(flat).all() and not flat.any()


def test_resize_labels_keeps_label_values_and_image_is_smooth():
    image, mask = labelled_volume(shape=(13, 17, 11))
    small = resize_labels(mask, (8, 8, 8))
    assert small.shape == (8, 8, 8) and set(small.unique().tolist()) <= {0, 1, 2, 4}
    assert resize_image(image, (8, 8, 8)).shape == (3, 8, 8, 8)
    assert torch.equal(resize_labels(small, (8, 8, 8)), small)


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


def test_missing_sequences_become_copies_of_the_fill_channel_on_every_slice():
    """A 2.5D sample (3 slices of 3 sequences): the lost sequences are copies of channel 1 in every slice's
    block, the same ones in each; channel 1 and the sequences kept are untouched."""
    image = torch.arange(9, dtype=torch.float32).view(9, 1, 1).expand(9, 4, 4).clone()
    lost_sets = set()
    for seed in range(20):
        out = random_missing_sequences(image, torch.Generator().manual_seed(seed), 1.0, 1, 3)
        blocks, source = out.view(3, 3, 4, 4), image.view(3, 3, 4, 4)
        assert torch.equal(blocks[:, 1], source[:, 1])
        lost = tuple(c for c in (0, 2) if torch.equal(blocks[:, c], source[:, 1]))
        kept = [c for c in (0, 2) if c not in lost]
        assert lost and all(torch.equal(blocks[:, c], source[:, c]) for c in kept)
        lost_sets.add(lost)
    assert lost_sets == {(0,), (2,), (0, 2)}


def test_missing_sequences_off_by_default_and_checked():
    image = torch.randn(4, 6, 6, 6)
    assert random_missing_sequences(image, torch.Generator().manual_seed(0), 1.0, -1, 4) is image
    assert random_missing_sequences(image, torch.Generator().manual_seed(0), 0.0, 0, 4) is image
    cfg = DataConfig(missing_prob=1.0, fill_channel=0, flip_prob=0, rot90_prob=0, rotate_prob=0,
                     intensity_prob=0, gamma_prob=0, noise_prob=0)
    out, _ = augment(image, torch.zeros(6, 6, 6, dtype=torch.uint8), torch.Generator().manual_seed(0), cfg)
    assert any(torch.equal(out[c], image[0]) for c in (1, 2, 3)) and torch.equal(out[0], image[0])
    bad = Config()
    bad.data.missing_prob, bad.data.fill_channel = 0.2, 4
    with pytest.raises(ValueError, match="data.fill_channel"):
        check(bad)


def test_full_augmentation_with_intensity_is_reproducible():
    cfg = DataConfig(zoom_prob=1.0, intensity_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    image, mask = torch.randn(4, 8, 8, 8), torch.randint(0, 2, (8, 8, 8), dtype=torch.uint8)
    first = augment(image, mask, torch.Generator().manual_seed(5), cfg)
    second = augment(image, mask, torch.Generator().manual_seed(5), cfg)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_resampled_shape_keeps_the_field_of_view():
    from transforms.resample import resampled_shape
    assert resampled_shape((140, 172, 140), (1.0, 1.0, 1.0), (1.75, 1.75, 1.75)) == (80, 98, 80)
    assert resampled_shape((40, 200, 190), (3.0, 0.8, 0.8), (3.0, 1.6, 1.6)) == (40, 100, 95)
    assert resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)


def test_resample_image_is_trilinear_channel_first_and_identity_at_the_same_spacing():
    from transforms.resample import resample_image
    image = torch.rand(2, 9, 12, 10)
    assert torch.allclose(resample_image(image, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), image, atol=1e-6)
    coarse = resample_image(image.numpy(), (1.0, 1.0, 1.0), (1.5, 2.0, 1.0))
    assert coarse.shape == (2, 6, 6, 10) and coarse.dtype == torch.float32
    ramp = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 4, 4)
    assert torch.allclose(resample_image(ramp, (1.0, 1.0, 1.0), (2.0, 1.0, 1.0))[0, :, 0, 0],
                          torch.tensor([0.5, 2.5, 4.5, 6.5]))  # means of voxel pairs: linear, not nearest


def test_resample_labels_is_nearest_and_a_2x_round_trip_is_exact():
    from transforms.resample import resample_labels
    _, mask = labelled_volume(shape=(8, 10, 12))
    fine = resample_labels(mask, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    assert fine.shape == (16, 20, 24) and fine.dtype == mask.dtype
    assert set(fine.unique().tolist()) == set(mask.unique().tolist())
    assert torch.equal(resample_labels(fine, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)), mask)
    coarse = resample_labels(mask.numpy(), (1.0, 1.0, 1.0), (1.75, 1.75, 1.75))
    assert coarse.shape == (5, 6, 7) and set(coarse.unique().tolist()) <= set(mask.unique().tolist())


def test_resample_back_returns_probabilities_on_the_native_grid():
    from transforms.resample import resample_back
    probs = torch.rand(3, 5, 6, 5)
    native = resample_back(probs, (9, 11, 10))
    assert native.shape == (3, 9, 11, 10) and native.min() >= 0 and native.max() <= 1
    assert torch.allclose(resample_back(torch.full((3, 4, 4, 4), 0.3), (7, 9, 8)), torch.full((3, 7, 9, 8), 0.3))
