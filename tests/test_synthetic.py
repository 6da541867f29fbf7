import logging
import os

import numpy as np
import pytest

from cases import h5, synthetic

SHAPES = [(24, 24, 24), (29, 33, 35), (40, 36, 38)]


def make(seed, shape=(33, 36, 38), with_enhancing=True):
    return synthetic.make_case(np.random.default_rng(seed), shape, with_enhancing)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_dtypes_and_labels(shape):
    image, mask = make(0, shape)
    assert image.shape == (4, *shape) and image.dtype == np.float32
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= set(h5.BRATS_LABELS)
    assert np.all(np.isfinite(image))


@pytest.mark.parametrize("seed", range(4))
def test_background_is_zero_and_tumour_lies_inside_brain(seed):
    image, mask = make(seed)
    brain = image[0] > 0
    # Skull-stripped: every channel is zero exactly where the brain is absent, positive inside.
    for channel in image:
        assert np.array_equal(channel > 0, brain)
        assert np.all(channel[~brain] == 0)
    assert 0.25 < brain.mean() < 0.8, "the brain should fill most of the volume"
    assert not brain[0, 0, 0] and not brain[-1, -1, -1]
    assert np.all(mask[~brain] == 0)
    assert (mask > 0).any()


def test_same_seed_same_case_different_seed_different_case():
    image_a, mask_a = make(7)
    image_b, mask_b = make(7)
    image_c, mask_c = make(8)
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_enhancing", [True, False])
def test_enhancing_tumour_present_only_when_asked(seed, with_enhancing):
    _, mask = make(seed, (24, 26, 28), with_enhancing)
    assert (mask == 4).any() == with_enhancing
    assert (mask == 1).any() and (mask == 2).any()


def test_enhancing_rim_surrounds_necrosis():
    # Averaged over cases, the enhancing rim lies further from the tumour-core centre than necrosis.
    for seed in range(3):
        _, mask = make(seed, (40, 44, 44))
        centre = np.argwhere((mask == 1) | (mask == 4)).mean(0)
        def mean_distance(label):
            return np.linalg.norm(np.argwhere(mask == label) - centre, axis=1).mean()
        assert mean_distance(4) > mean_distance(1)


def test_flair_brighter_in_tumour_but_not_a_perfect_separator():
    flair_tumour, flair_normal = [], []
    for seed in range(3):
        image, mask = make(seed, (36, 40, 40))
        brain = image[0] > 0
        tumour = mask > 0
        flair_tumour.append(image[0][tumour])
        flair_normal.append(image[0][brain & ~tumour])
        assert image[0][tumour].mean() > image[0][brain & ~tumour].mean()
        # Some normal-brain voxels are brighter than some tumour voxels: no single threshold works.
        assert image[0][brain & ~tumour].max() > image[0][tumour].min()
    # Pooled over cases the best single FLAIR threshold still misclassifies a fair share.
    values = np.concatenate(flair_tumour + flair_normal)
    is_tumour = np.concatenate([np.ones(a.size, bool) for a in flair_tumour]
                               + [np.zeros(a.size, bool) for a in flair_normal])
    best_dice = max(_dice(values > t, is_tumour) for t in np.quantile(values, np.linspace(0.5, 0.99, 50)))
    assert best_dice < 0.9


def _dice(predicted, truth):
    return 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())


def test_contrasts_follow_mri_conventions():
    image, mask = make(1, (40, 44, 44))
    flair, t1, t1ce, t2 = image
    brain = image[0] > 0
    normal = brain & (mask == 0)
    assert t1ce[mask == 4].mean() > t1ce[mask == 1].mean()
    assert t1ce[mask == 4].mean() > t1ce[normal].mean()
    assert t1[mask > 0].mean() < t1[normal].mean()
    assert t2[mask == 2].mean() > t2[normal].mean()


def test_generate_dataset_writes_readable_cases(tmp_path, caplog):
    out_dir = str(tmp_path / "synthetic")
    with caplog.at_level(logging.INFO, logger="cases.synthetic"):
        paths = synthetic.generate_dataset(out_dir, n_cases=5, seed=3, min_size=20, max_size=30)
    assert [os.path.basename(p) for p in paths] == [f"case_{i:03d}.h5" for i in range(5)]
    assert "5 synthetic cases" in caplog.text
    shapes, enhancing = set(), []
    for path in paths:
        case = h5.read_case(path)
        assert case.image.shape[0] == 4 and case.mask.shape == case.image.shape[1:]
        assert all(20 <= side <= 30 for side in case.mask.shape)
        assert case.mask.shape[0] <= min(case.mask.shape[1:])  # depth no larger than height, width
        shapes.add(case.mask.shape)
        enhancing.append(bool((case.mask == 4).any()))
    assert len(shapes) > 1
    assert enhancing.count(False) == 1


def test_generate_dataset_is_deterministic(tmp_path):
    first = synthetic.generate_dataset(str(tmp_path / "a"), n_cases=2, seed=5, min_size=18, max_size=22)
    second = synthetic.generate_dataset(str(tmp_path / "b"), n_cases=3, seed=5, min_size=18, max_size=22)
    for path_a, path_b in zip(first, second):
        case_a, case_b = h5.read_case(path_a), h5.read_case(path_b)
        assert np.array_equal(case_a.image, case_b.image) and np.array_equal(case_a.mask, case_b.mask)


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        synthetic.generate_dataset(str(tmp_path), n_cases=1, min_size=40, max_size=30)
    with pytest.raises(ValueError, match="16 voxels"):
        make(0, (8, 20, 20))
