"""Each real layout converts into the project layout (and trains); the real BraTS 2018 sample round-trips."""
import os

import h5py
import numpy as np
import pytest

import main  # noqa: E402
import prepare_data  # noqa: E402
from cases.geometry import to_original_grid
from cases.h5 import CaseFormat, read_case  # noqa: E402
from conftest import ROOT
from conversion import layouts as convert  # noqa: E402
from conversion import nifti  # noqa: E402
from layout_fixtures import (
    AFFINE,
    CHANNEL_BASE,
    write_generic_h5,
    write_kaggle_volume,
    write_lgg_patient,
    write_nifti_case,
)

BRATS18 = os.path.join(ROOT, "..", "shared", "data", "brats18-sample")
# Voxels per label in the four real cases, from ../shared/data/README.md.
BRATS18_COUNTS = {"Brats18_2013_3_1": (10430, 67269, 23187), "Brats18_CBICA_ABM_1": (3398, 30215, 6159),
                  "Brats18_TCIA02_135_1": (3614, 44701, 33532), "Brats18_TCIA10_628_1": (103582, 51717, 1976)}
TINY_TRAIN = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--train.epochs", "1",
              "--data.num_workers", "0", "--data.test_fraction", "0", "--data.val_fraction", "0.34"]


def prepare(*args):
    """Run prepare_data in-process; returns the exit code (0 when it returns normally)."""
    try:
        prepare_data.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def train(data_dir, run_dir, *extra):
    main.main(["--data.dir", str(data_dir), "--train.out_dir", str(run_dir), "--train.name", "run",
               *TINY_TRAIN, *extra])
    assert os.path.isfile(os.path.join(run_dir, "run", "best.pt"))


def channel_means(image):
    return [float(c[c != 0].mean()) for c in image]


@pytest.fixture
def nib():
    """nibabel, for the tests that write or read NIfTI (the others run without it)."""
    return pytest.importorskip("nibabel", reason="NIfTI tests need nibabel: pip install -r requirements-extra.txt")


@pytest.fixture
def tifffile():
    return pytest.importorskip("tifffile", reason="TIFF tests need tifffile: pip install -r requirements-extra.txt")


# ----------------------------------------------------------------------------------- BraTS NIfTI

@pytest.mark.parametrize("convention", ["2018", "2023"])
def test_brats_folder_converts_cropped_transposed_and_in_2018_labels(nib, tmp_path, convention):
    folder, image, labels = write_nifti_case(tmp_path / "src" / "HGG", "Case_1", convention=convention)
    assert prepare("brats", tmp_path / "src", tmp_path / "out") == 0
    case = read_case(str(tmp_path / "out" / "Case_1.h5"))
    assert case.attrs["label_convention"] == convention
    assert case.attrs["source_format"] == "brats-nifti"
    assert case.attrs["original_shape"] == [18, 22, 20]  # NIfTI (X, Y, Z) stored as (Z, Y, X)
    assert case.spacing == (1.5, 1.0, 1.0)
    assert set(np.unique(case.mask)) <= {0, 1, 2, 4} and (case.mask == 4).any()
    # every channel in project order (flair, t1, t1ce, t2), whatever the file names
    assert [round(m, -2) for m in channel_means(case.image)] == list(CHANNEL_BASE)
    box = case.attrs["crop_box"]
    assert case.image.shape[1:] == tuple(stop - start for start, stop in box)
    assert np.prod(case.image.shape[1:]) < 18 * 22 * 20  # background cropped away
    expected = np.where(labels == 3, 4, labels)
    assert np.array_equal(to_original_grid(case.mask, case.attrs), expected)
    assert np.array_equal(case.attrs["affine"], AFFINE)


def test_brats_lone_seg_file_with_another_name_is_found(nib, tmp_path):
    """BraTS20_Training_355 ships its segmentation as W39_1998.09.19_Segm.nii."""
    _, _, labels = write_nifti_case(tmp_path, "BraTS20_Training_355", seg_name="W39_1998.09.19_Segm.nii")
    case = nifti.read_brats(str(tmp_path / "BraTS20_Training_355"))
    assert np.array_equal(to_original_grid(case.mask, case.attrs), labels)


def test_brats_validation_case_without_seg_converts_image_only(nib, tmp_path):
    write_nifti_case(tmp_path / "src", "Val_1", seg_name=None)
    assert prepare("brats", tmp_path / "src", tmp_path / "out") == 0
    with h5py.File(tmp_path / "out" / "Val_1.h5") as f:
        assert "mask" not in f and f["image"].shape[0] == 4


def test_rerun_keeps_written_cases_and_interrupted_write_leaves_no_partial_file(nib, tmp_path, monkeypatch):
    for i in range(2):
        write_nifti_case(tmp_path / "src", f"Case_{i}", seed=i)
    sources = nifti.find_brats(str(tmp_path / "src"))
    calls = []

    def read_then_interrupt(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return nifti.read_brats(folder)

    with pytest.raises(KeyboardInterrupt):
        prepare_data.convert_all(sources, read_then_interrupt, str(tmp_path / "out"), overwrite=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["Case_0.h5"]  # whole file, no temporary left behind
    read_case(str(tmp_path / "out" / "Case_0.h5"))
    written, kept, skipped = prepare_data.convert_all(sources, nifti.read_brats, str(tmp_path / "out"), False)
    assert (written, kept, skipped) == (1, 1, [])


def test_brats_fixture_trains_for_an_epoch(nib, tmp_path):
    for i in range(3):
        write_nifti_case(tmp_path / "src", f"Case_{i}", seed=i, convention="2023" if i else "2018")
    assert prepare("brats", tmp_path / "src", tmp_path / "out") == 0
    train(tmp_path / "out", tmp_path / "runs")


# ------------------------------------------------------------------------------- Kaggle slices

def test_kaggle_slices_stack_in_numeric_order_with_labels_1_2_4(tmp_path):
    src = tmp_path / "BraTS2020_training_data" / "content" / "data"
    for v in (1, 2, 3):
        image, labels = write_kaggle_volume(src, v, seed=v)
    assert prepare("kaggle-slices", tmp_path / "BraTS2020_training_data", tmp_path / "out", "--no-crop") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["volume_1.h5", "volume_2.h5", "volume_3.h5"]
    case = read_case(str(tmp_path / "out" / "volume_3.h5"))
    assert case.image.shape == (4, 12, 24, 24) and case.attrs["source_format"] == "kaggle-slices"
    assert np.array_equal(case.mask, labels)
    tagged = np.where(image > 0, image + np.arange(12)[:, None, None] / 100, 0)  # as write_kaggle_volume tags
    assert np.allclose(case.image, tagged)  # slice 10 after 9, not after 1
    train(tmp_path / "out", tmp_path / "runs")


def test_kaggle_slices_are_cropped_to_the_brain(tmp_path):
    write_kaggle_volume(tmp_path, 7)
    case = convert.read_kaggle_volume(convert.find_kaggle_slices(str(tmp_path))[0][1])
    assert case.case_id == "volume_7" and case.attrs["original_shape"] == [12, 24, 24]
    assert case.image.shape[2] < 24


# ---------------------------------------------------------------------------------------- LGG

def test_lgg_patients_stack_in_numeric_order_with_binary_labels(tifffile, tmp_path):
    for i, patient in enumerate(["TCGA_CS_4941_19960909", "TCGA_FG_6692_20020606", "TCGA_HT_7877_19980917"]):
        write_lgg_patient(tmp_path, patient, seed=i)
    assert prepare("lgg", tmp_path, tmp_path / "out") == 0
    case = read_case(str(tmp_path / "out" / "TCGA_CS_4941_19960909.h5"), CaseFormat(channels=3, labels=(0, 1)))
    assert case.image.shape == (3, 12, 32, 32)
    assert case.image[0, :, 0, 0].tolist() == list(range(1, 13))
    assert set(np.unique(case.mask)) == {0, 1}
    assert case.attrs["modalities"] == ["pre-contrast", "flair", "post-contrast"]
    train(tmp_path / "out", tmp_path / "runs", "--data.channels", "3", "--model.in_channels", "3")


# ---------------------------------------------------------------------------------- generic h5

def test_generic_h5_trains_without_conversion(tmp_path):
    """Channel-last images under 'raw', labels 1/2/3 under 'label': read directly with a label map."""
    for i in range(3):
        write_generic_h5(str(tmp_path / "data" / f"p{i}.h5"), seed=i)
    train(tmp_path / "data", tmp_path / "runs", "--data.image_key", "raw", "--data.mask_key", "label",
          "--data.label_map", "3:4")


def test_generic_h5_converts_to_the_project_layout(tmp_path):
    image, labels = write_generic_h5(str(tmp_path / "src" / "p0.h5"))
    assert prepare("h5", tmp_path / "src", tmp_path / "out", "--image-key", "raw", "--mask-key", "label",
                   "--label-map", "3:4") == 0
    case = read_case(str(tmp_path / "out" / "p0.h5"))
    assert np.array_equal(case.image, image.astype(np.float32))
    assert np.array_equal(case.mask, np.where(labels == 3, 4, labels))
    assert case.attrs["source_format"] == "h5"


def test_synthetic_subcommand_writes_cases(tmp_path):
    assert prepare("synthetic", tmp_path / "out", "--cases", "2") == 0
    assert len(os.listdir(tmp_path / "out")) == 2


# --------------------------------------------------------------------- real BraTS 2018 sample

@pytest.fixture(scope="module")
def brats18(tmp_path_factory):
    pytest.importorskip("nibabel", reason="reading the real BraTS sample needs nibabel")
    if not os.path.isdir(BRATS18):
        pytest.skip(f"real BraTS sample not found at {BRATS18}")
    out = tmp_path_factory.mktemp("brats18")
    assert prepare("brats", BRATS18, out) == 0
    return str(out)


def test_real_brats18_converts_with_known_shapes_labels_and_intensities(brats18):
    assert sorted(os.listdir(brats18)) == [f"{case}.h5" for case in sorted(BRATS18_COUNTS)]
    for case_id, counts in BRATS18_COUNTS.items():
        case = read_case(os.path.join(brats18, f"{case_id}.h5"))
        assert case.attrs["original_shape"] == [155, 240, 240]
        assert case.image.shape[0] == 4 and all(60 < s < 240 for s in case.image.shape[1:])
        assert [int((case.mask == label).sum()) for label in (1, 2, 4)] == list(counts)
        # int16 MRI intensities: non-negative whole numbers, a real dynamic range in every channel
        assert case.image.min() >= 0 and np.all(case.image == np.round(case.image))
        assert all(100 < c.max() < 32768 for c in case.image)


def test_real_brats18_affine_and_grid_round_trip_exactly(brats18, nib, tmp_path):
    case_id = "Brats18_CBICA_ABM_1"
    source = nib.load(os.path.join(BRATS18, case_id, f"{case_id}_seg.nii.gz"))
    case = read_case(os.path.join(brats18, f"{case_id}.h5"))
    affine = np.asarray(case.attrs["affine"])
    assert np.array_equal(affine, source.affine)
    restored = to_original_grid(case.mask, case.attrs)
    assert np.array_equal(restored, np.asarray(source.dataobj))
    nib.save(nib.Nifti1Image(restored, affine), tmp_path / "pred.nii.gz")
    again = nib.load(tmp_path / "pred.nii.gz")
    assert np.array_equal(again.affine, source.affine)
    assert np.array_equal(np.asarray(again.dataobj), np.asarray(source.dataobj))
    flair = np.asarray(nib.load(os.path.join(BRATS18, case_id, f"{case_id}_flair.nii.gz")).dataobj)
    assert np.array_equal(to_original_grid(case.image[0], case.attrs), flair)


def test_real_brats18_trains_resized_small(brats18, tmp_path):
    main.main(["--data.dir", brats18, "--train.out_dir", str(tmp_path), "--train.name", "run",
               "--data.image_size", "32", "--model.base_channels", "8", "--train.epochs", "1",
               "--data.num_workers", "0", "--data.test_fraction", "0", "--data.val_fraction", "0.25"])
    assert os.path.isfile(tmp_path / "run" / "best.pt")
