"""A BraTS NIfTI case folder that cannot be read as it claims is refused in one DataError naming
the file and the problem: a 4-D modality, a segmentation that cannot be told apart, shapes that
disagree, non-integer labels, and label 4 under the BraTS 2023 names (where 3 is enhancing and 4,
since 2024, the resection cavity)."""
import os

import numpy as np
import pytest

from cases.h5 import DataError
from conversion.nifti import read_brats
from layout_fixtures import AFFINE, write_nifti_case

SHAPE = (20, 22, 18)  # write_nifti_case's NIfTI (X, Y, Z) shape


@pytest.fixture
def nib():
    return pytest.importorskip("nibabel", reason="NIfTI tests need nibabel: pip install -r requirements-extra.txt")


def save(nib, folder, name, array):
    path = os.path.join(folder, name)
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return path


def refused(folder, *parts):
    with pytest.raises(DataError) as error:
        read_brats(folder)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and all(part in message for part in parts), message


def test_a_4d_modality_is_refused(nib, tmp_path):
    folder, image, _ = write_nifti_case(str(tmp_path), "Case")
    save(nib, folder, "Case_t1.nii.gz", image[1][..., None])       # (X, Y, Z, 1): a time axis
    refused(folder, "Case_t1.nii.gz: NIfTI has shape (20, 22, 18, 1); expected 3 dimensions")


def test_two_segmentation_files_are_ambiguous(nib, tmp_path):
    folder, _, labels = write_nifti_case(str(tmp_path), "Case")
    save(nib, folder, "Case_seg.nii", labels)                       # beside Case_seg.nii.gz
    refused(folder, f"{folder}: cannot tell which file is the segmentation among",
            "'Case_seg.nii'", "'Case_seg.nii.gz'")


def test_two_unnamed_leftover_files_are_ambiguous(nib, tmp_path):
    folder, _, labels = write_nifti_case(str(tmp_path), "Case", seg_name=None)
    save(nib, folder, "Case_mask.nii.gz", labels)
    save(nib, folder, "Case_label.nii.gz", labels)
    refused(folder, "cannot tell which file is the segmentation among", "Case_label.nii.gz", "Case_mask.nii.gz")


def test_a_segmentation_of_another_shape_is_refused(nib, tmp_path):
    folder, _, labels = write_nifti_case(str(tmp_path), "Case")
    save(nib, folder, "Case_seg.nii.gz", labels[:, :, :-1])
    refused(folder, "Case_seg.nii.gz: mask has shape (20, 22, 17), image has (20, 22, 18); they must match")


def test_a_modality_of_another_shape_is_refused(nib, tmp_path):
    folder, image, _ = write_nifti_case(str(tmp_path), "Case")
    save(nib, folder, "Case_t2.nii.gz", image[3][:-1])
    refused(folder, "Case_t2.nii.gz: shape (19, 22, 18) differs from", "Case_flair.nii.gz (20, 22, 18)")


def test_non_integer_labels_are_refused(nib, tmp_path):
    folder, _, labels = write_nifti_case(str(tmp_path), "Case")
    fractional = labels.astype(np.float32)
    fractional[fractional == 2] = 1.5                               # a resampled (interpolated) segmentation
    save(nib, folder, "Case_seg.nii.gz", fractional)
    refused(folder, "Case_seg.nii.gz: segmentation holds non-integer values; expected a label map")


def test_label_4_under_2023_names_is_refused_naming_both_conventions(nib, tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:10, 5:10, 5:10] = 2
    labels[6:8, 6:8, 6:8] = 4                                        # 2018-21 enhancing, 2024+ resection cavity
    folder, _, _ = write_nifti_case(str(tmp_path), "BraTS-GLI-00001-000", convention="2023", labels=labels)
    refused(folder, "BraTS-GLI-00001-000-seg.nii.gz: mask has label values [4] outside [0, 1, 2, 3]",
            "BraTS 2023 naming, whose labels are [0, 1, 2, 3] (BraTS 2018 uses [0, 1, 2, 4])")


def test_the_same_labels_under_2018_names_read_with_enhancing_4(nib, tmp_path):
    """The control of the test above: the file is fine under the naming whose labels it uses."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:10, 5:10, 5:10] = 2
    labels[6:8, 6:8, 6:8] = 4
    folder, _, _ = write_nifti_case(str(tmp_path), "Case", labels=labels)
    mask = read_brats(folder, crop=False).mask
    assert np.array_equal(mask, labels.transpose(2, 1, 0))          # stored (Z, Y, X)
