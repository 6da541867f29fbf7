"""Export: label maps back on the source grid (NIfTI with the source affine, or .h5),
probabilities, overlays; and the real BraTS cases end to end in patch mode."""
import csv
import glob
import json
import os

import h5py
import numpy as np
import pytest

import real_brats
from cases.geometry import to_original_grid, uncrop
from cases.h5 import DataError, read_case, write_case
from evaluation.export import export_case, largest_tumour_slice, save_label_map
from transforms.regions import labels_to_regions

try:
    import nibabel as nib
except ImportError:  # only the NIfTI tests need it; they skip, the rest of the file runs
    nib = None
NEEDS_NIBABEL = pytest.mark.skipif(nib is None, reason="NIfTI tests need nibabel: pip install -r requirements-extra.txt")



def nifti_like_case(tmp_path, affine, xyz_shape=(30, 26, 18), box_xyz=((4, 25), (3, 20), (2, 15))):
    """A case as the converter makes it from a NIfTI volume of xyz_shape: labels (X, Y, Z), stored
    transposed and cropped. Returns (stored case, source labels (X, Y, Z))."""
    rng = np.random.default_rng(0)
    source = np.zeros(xyz_shape, np.uint8)
    inner = tuple(slice(a + 2, b - 2) for a, b in box_xyz)
    source[inner] = rng.choice([0, 1, 2, 4], size=source[inner].shape).astype(np.uint8)
    stored = source.transpose(2, 1, 0)
    box = [list(pair) for pair in box_xyz[::-1]]
    crop = tuple(slice(a, b) for a, b in box)
    image = np.ones((4, *stored.shape), np.float32)[(slice(None), *crop)]
    path = write_case(str(tmp_path / "nifti_case.h5"), image, stored[crop], spacing=(2.5, 1.0, 1.0),
                      affine=affine, original_shape=stored.shape, crop_box=box)
    return read_case(path), source


def test_uncrop_and_orientation_invert_the_conversion(tmp_path):
    case, source = nifti_like_case(tmp_path, np.diag([-1.0, -1.0, 2.5, 1.0]))
    np.testing.assert_array_equal(to_original_grid(case.mask, case.attrs), source)
    regions = labels_to_regions(case.mask).numpy()
    back = to_original_grid(regions, case.attrs)
    assert back.shape == (3, *source.shape)
    np.testing.assert_array_equal(back[0] > 0, source > 0)


def test_scores_count_the_cropped_background_as_true_negatives(tmp_path):
    from evaluation.metrics import confusion
    from evaluation.scoring import scoring_grid

    case, source = nifti_like_case(tmp_path, np.eye(4))
    regions = labels_to_regions(case.mask).numpy() > 0.5
    full = scoring_grid(regions, case.attrs)
    assert full.shape == (3, *source.shape[::-1]) and full.sum() == regions.sum()
    empty = np.zeros_like(full[0])
    assert confusion(empty, full[0])[3] == source.size - regions[0].sum()


def test_uncrop_refuses_a_box_that_does_not_fit():
    with pytest.raises(DataError, match="crop_box"):
        uncrop(np.zeros((4, 5, 6)), [[0, 4], [0, 5], [0, 7]], (10, 10, 10))
    with pytest.raises(DataError, match="original_shape"):
        uncrop(np.zeros((4, 5, 6)), [[8, 12], [0, 5], [0, 6]], (10, 10, 10))


@NEEDS_NIBABEL
@pytest.mark.parametrize("enhancing_label", [4, 3])
def test_nifti_export_has_source_shape_affine_and_labels(tmp_path, enhancing_label):
    affine = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 2.5, -70], [0, 0, 0, 1]])
    case, source = nifti_like_case(tmp_path, affine)
    regions = labels_to_regions(case.mask).numpy() > 0.5
    written = export_case(str(tmp_path / "out"), case, regions, probs=regions.astype(np.float32),
                          default_enhancing=enhancing_label)
    label_path, prob_path, png_path = written
    assert label_path.endswith("predictions/nifti_case.nii.gz")
    saved = nib.load(label_path)
    assert saved.shape == source.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(saved.affine, affine)
    expected = np.where(source == 4, enhancing_label, source)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), expected)
    assert saved.header.get_zooms() == (1.0, 1.0, 2.5)
    probs = np.load(prob_path)
    assert probs["probabilities"].shape == (3, *source.shape) and list(probs["regions"]) == ["WT", "TC", "ET"]
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cases_without_an_affine_are_exported_as_h5(tmp_path):
    mask = np.zeros((9, 10, 11), np.uint8)
    mask[2:5, 3:6, 4:8] = 2
    mask[3, 4, 5] = 4
    case = read_case(write_case(str(tmp_path / "plain.h5"), np.ones((4, 9, 10, 11), np.float32), mask,
                                spacing=(3.0, 1.0, 1.0)))
    path = save_label_map(str(tmp_path / "out"), "plain", mask, case.attrs, case.spacing)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["mask"][()], mask)
        assert list(f.attrs["spacing"]) == [3.0, 1.0, 1.0]


def test_overlay_slice_is_the_one_with_most_tumour():
    regions = np.zeros((3, 7, 5, 5), bool)
    regions[0, 2, :2] = True
    regions[0, 5, :4] = True
    assert largest_tumour_slice(regions) == 5
    assert largest_tumour_slice(np.zeros((3, 7, 5, 5), bool)) == 3


# ---- the shared real BraTS cases -------------------------------------------------------------

needs_real = pytest.mark.skipif(not real_brats.sample_cases(), reason=real_brats.SKIP_REASON)


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory):
    pytest.importorskip("nibabel", reason="converting the real BraTS cases needs nibabel")
    if not real_brats.sample_cases():
        pytest.skip(real_brats.SKIP_REASON)
    folder = tmp_path_factory.mktemp("brats_h5")
    return real_brats.convert_all(str(folder))


def bounding_box(mask):
    where = np.argwhere(mask)
    return where.min(0).tolist(), where.max(0).tolist()


@needs_real
def test_perfect_prediction_of_a_real_case_lands_exactly_on_its_source_seg(real_dataset, tmp_path):
    for path in sorted(glob.glob(os.path.join(real_dataset, "*.h5"))):
        case = read_case(path)
        truth = labels_to_regions(case.mask).numpy() > 0.5
        label_path = export_case(str(tmp_path), case, truth, overlay=False)[0]
        source = nib.load(real_brats.source_seg_path(case.case_id))
        exported = nib.load(label_path)
        assert exported.shape == source.shape == (240, 240, 155)
        np.testing.assert_array_equal(exported.affine, source.affine)
        labels, source_labels = np.asarray(exported.dataobj), np.asarray(source.dataobj)
        assert bounding_box(labels > 0) == bounding_box(source_labels > 0)
        np.testing.assert_array_equal(labels, source_labels)
        flair = np.asarray(nib.load(label_path.replace("predictions/", "").replace(
            str(tmp_path), os.path.join(real_brats.BRATS_SAMPLE, case.case_id)).replace(
            ".nii.gz", "_flair.nii.gz")).dataobj)
        assert (flair[labels > 0] > 0).mean() > 0.99  # the tumour lies on brain in the source FLAIR


@needs_real
def test_patch_training_on_real_cases_then_exported_predictions_fit_the_sources(real_dataset, tmp_path):
    import evaluate
    import main

    # CPU-sized: 3 training cases, small patches, 2 epochs; no test split, so the (slow, whole-case)
    # scoring is on the validation case: main.py's, then through the evaluate command line
    run_dir = main.train_and_evaluate(main.build_config({
        "data.dir": real_dataset, "data.mode": "patch", "data.patch_size": "32", "data.patches_per_case": "2",
        "data.val_fraction": "0.25", "data.test_fraction": "0.0", "data.num_workers": "0",
        "model.base_channels": "4", "model.depth": "3", "train.epochs": "2", "train.batch_size": "2",
        "train.out_dir": str(tmp_path), "train.name": "real", "eval.overlap": "0.0", "eval.sw_batch_size": "8"}))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        assert len(list(csv.DictReader(f))) == 2
    out = str(tmp_path / "eval")
    evaluate.main(["--checkpoint", os.path.join(run_dir, "best.pt"), "--split", "val", "--out", out,
                   "--save-predictions", "--save-probabilities", "--eval.postprocess_et_min", "50"])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["cases"] == 1
    assert {"dice", "iou", "hd95", "sensitivity", "specificity", "hd95_std", "hd95_median"} <= set(
        summary["regions"]["ET"])
    with open(os.path.join(out, "per_case.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and "WT_hd95" in rows[0] and "ET_specificity" in rows[0]
    with open(os.path.join(run_dir, "split.json")) as f:
        val_cases = json.load(f)["val"]
    for case_id in val_cases:
        source = nib.load(real_brats.source_seg_path(case_id))
        predicted = nib.load(os.path.join(out, "predictions", f"{case_id}.nii.gz"))
        assert predicted.shape == source.shape
        np.testing.assert_array_equal(predicted.affine, source.affine)
        assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2, 4}
        probs = np.load(os.path.join(out, "predictions", f"{case_id}_probabilities.npz"))["probabilities"]
        assert probs.shape == (3, *source.shape)
        assert os.path.getsize(os.path.join(out, "overlays", f"{case_id}.png")) > 1000


def test_resize_mode_evaluate_and_predict_write_h5_label_maps(tiny_dataset, tmp_path):
    import evaluate
    import main

    run_dir = main.train_and_evaluate(main.build_config({
        "data.dir": tiny_dataset, "data.image_size": "16", "data.num_workers": "0", "model.base_channels": "4",
        "model.depth": "2", "train.epochs": "1", "train.out_dir": str(tmp_path), "train.name": "tiny",
        "data.min_test_cases": "1"}))  # a test split of 1 of the 6 cases
    checkpoint = os.path.join(run_dir, "best.pt")
    out = str(tmp_path / "eval")
    evaluate.main(["--checkpoint", checkpoint, "--split", "test", "--out", out, "--save-predictions"])
    with open(os.path.join(run_dir, "split.json")) as f:
        test_cases = json.load(f)["test"]
    for case_id in test_cases:
        with h5py.File(os.path.join(out, "predictions", f"{case_id}.h5")) as f:
            assert f["mask"].shape == (20, 24, 22) and f["mask"].dtype == np.uint8
        assert os.path.isfile(os.path.join(out, "overlays", f"{case_id}.png"))
    # unlabelled cases: --predict exports without scoring
    unlabelled = tmp_path / "unlabelled"
    image = read_case(glob.glob(os.path.join(tiny_dataset, "*.h5"))[0]).image
    write_case(str(unlabelled / "new_case.h5"), image)
    evaluate.main(["--checkpoint", checkpoint, "--split", "all", "--data.dir", str(unlabelled),
                   "--out", str(tmp_path / "pred"), "--predict", "--no-overlays"])
    assert sorted(os.listdir(tmp_path / "pred")) == ["confidence.csv", "predictions"]
    assert os.path.isfile(tmp_path / "pred" / "predictions" / "new_case.h5")
