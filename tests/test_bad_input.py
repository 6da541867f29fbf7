"""Each kind of bad input stops with one line naming the file and the problem, never a traceback.

The entry points run as subprocesses, as a user would run them. The table of bad training files
runs main.main in-process (sys.exit(message) is exactly what the subprocess prints) so the suite
stays fast; one of them also runs as a subprocess.
"""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, write_blob_dataset
from layout_fixtures import write_kaggle_volume, write_lgg_patient, write_nifti_case

READERS = {"brats": "nibabel", "lgg": "tifffile"}  # the optional package each source layout is read with


def needs(package):
    """Skip the one test that reads or writes this optional format; the rest of the file runs without it."""
    pytest.importorskip(package, reason=f"{package} is needed here: pip install -r requirements-extra.txt")


def run_script(*args):
    return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value


def good_arrays(shape=(20, 24, 22)):
    from conftest import blob_case
    return blob_case(np.random.default_rng(0), shape)


def truncated(path):
    write_blob_dataset(os.path.dirname(path), n_cases=1)
    os.replace(os.path.join(os.path.dirname(path), "case_000.h5"), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def not_hdf5(path):
    open(path, "w").write("this is not an HDF5 file\n")


def corrupt_chunk(path):
    """A file that opens but whose compressed image chunks are garbage (a bad copy, a failing disk)."""
    image, mask = good_arrays()
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, chunks=(1, 20, 24, 22), compression="gzip")
        f["mask"] = mask
        offset = f["image"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)


def missing_key(path):
    write_h5(path, image=good_arrays()[0])


def shape_mismatch(path):
    image, mask = good_arrays()
    write_h5(path, image=image, mask=mask[:-2])


def wrong_channels(path):
    image, mask = good_arrays()
    write_h5(path, image=image[:3], mask=mask)


def nan_image(path):
    image, mask = good_arrays()
    image[1, 5, 5, 5] = np.nan
    write_h5(path, image=image, mask=mask)


def bad_labels(path):
    image, mask = good_arrays()
    mask[mask == 4] = 3
    write_h5(path, image=image, mask=mask)


# (writer of the bad file, words the error must contain)
BAD_CASES = {
    "truncated": (truncated, "cannot be read as HDF5"),
    "not-hdf5": (not_hdf5, "cannot be read as HDF5"),
    "corrupt-chunk": (corrupt_chunk, "dataset 'image' cannot be read"),
    "missing-key": (missing_key, "no dataset 'mask'; keys present: ['image']"),
    "shape-mismatch": (shape_mismatch, "mask has shape (18, 24, 22), image spatial shape is (20, 24, 22)"),
    "wrong-channels": (wrong_channels, "image has 3 channels"),
    "nan": (nan_image, "1 NaN/Inf values"),
    "labels": (bad_labels, "label values [3] outside [0, 1, 2, 4]"),
}


def main_error(*args):
    """The message main.main exits with, in-process."""
    import main
    with pytest.raises(SystemExit) as stop:
        main.main([str(a) for a in args])
    return stop.value.code


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_training_refuses_a_bad_case_naming_file_and_problem(tmp_path, kind):
    write_blob_dataset(str(tmp_path), n_cases=3)
    make_bad, problem = BAD_CASES[kind]
    bad = tmp_path / "case_bad.h5"
    make_bad(str(bad))
    message = main_error("--data.dir", tmp_path, "--train.out_dir", tmp_path / "runs")
    assert len(message.splitlines()) == 1 and message.startswith(f"error: {bad}: "), message
    assert problem in message, message
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


def test_training_cli_prints_one_line_without_traceback(tmp_path):
    write_blob_dataset(str(tmp_path), n_cases=2)
    nan_image(str(tmp_path / "case_bad.h5"))
    result = run_script("main.py", "--data.dir", tmp_path, "--train.out_dir", tmp_path / "runs")
    assert_one_line_error(result, f"{tmp_path / 'case_bad.h5'}: image contains 1 NaN/Inf values")


@pytest.mark.parametrize("content, problem", [([], "no .h5 case files found (empty)"),
                                              (["scan.nii.gz"], "no .h5 case files found (found e.g.")])
def test_training_refuses_a_folder_without_cases(tmp_path, content, problem):
    for name in content:
        open(tmp_path / name, "w").close()
    assert_one_line_error(run_script("main.py", "--data.dir", tmp_path), f"{tmp_path}: {problem}")


@pytest.mark.parametrize("layout", ["brats", "kaggle-slices", "lgg", "h5"])
def test_prepare_data_refuses_a_folder_without_matching_files(tmp_path, layout):
    if layout in READERS:  # prepare_data.py asks for the reader before it looks
        needs(READERS[layout])
    open(tmp_path / "notes.txt", "w").close()
    assert_one_line_error(run_script("prepare_data.py", layout, tmp_path, tmp_path / "out"),
                          f"{tmp_path}: no ", "found (found e.g. ['notes.txt'])")


def bad_brats_labels(src):
    write_nifti_case(src, "Bad", labels=np.full((20, 22, 18), 3, np.uint8))
    return "Bad", "label values [3] outside [0, 1, 2, 4]"


def bad_brats_truncated(src):
    folder, _, _ = write_nifti_case(src, "Bad")
    path = os.path.join(folder, "Bad_t1.nii.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    return "Bad", "Bad_t1.nii.gz: cannot be read as NIfTI"


def bad_brats_missing_modality(src):
    folder, _, _ = write_nifti_case(src, "Bad")
    os.remove(os.path.join(folder, "Bad_t1ce.nii.gz"))
    return "Bad", "expected one NIfTI file per modality"


def bad_kaggle_overlap(src):
    image, labels = write_kaggle_volume(src, 9)
    with h5py.File(os.path.join(src, "volume_9_slice_6.h5"), "r+") as f:
        mask = f["mask"][:]
        mask[..., 1] = 1  # edema everywhere, on top of NCR and ET
        f["mask"][...] = mask
    return "volume_9", "volume_9_slice_6.h5: one-hot mask channels (NCR, ED, ET) overlap in"


def bad_kaggle_missing_key(src):
    write_kaggle_volume(src, 9)
    with h5py.File(os.path.join(src, "volume_9_slice_3.h5"), "r+") as f:
        del f["mask"]
    return "volume_9", "volume_9_slice_3.h5: no dataset 'mask'; keys present: ['image']"


def bad_lgg_mask_values(src):
    import tifffile
    folder = write_lgg_patient(src, "TCGA_XX_0000_20000101", n_slices=4)
    tifffile.imwrite(os.path.join(folder, "TCGA_XX_0000_20000101_2_mask.tif"), np.full((32, 32), 128, np.uint8))
    return "TCGA_XX_0000_20000101", "_2_mask.tif: mask has label values [128] outside [0, 255]"


def bad_h5_channels(src):
    os.makedirs(src, exist_ok=True)
    write_h5(os.path.join(src, "p0.h5"), image=np.ones((16, 18, 20, 3), np.float32),
             mask=np.zeros((16, 18, 20), np.uint8))
    return "p0", "p0.h5: image has 16 channels (shape (16, 18, 20, 3)); the config expects 4"


# (layout, writer of one bad source case beside a good one)
BAD_SOURCES = {"brats-labels": ("brats", bad_brats_labels), "brats-truncated": ("brats", bad_brats_truncated),
               "brats-missing-modality": ("brats", bad_brats_missing_modality),
               "kaggle-overlap": ("kaggle-slices", bad_kaggle_overlap),
               "kaggle-missing-key": ("kaggle-slices", bad_kaggle_missing_key),
               "lgg-mask-values": ("lgg", bad_lgg_mask_values), "h5-channels": ("h5", bad_h5_channels)}
GOOD_SOURCE = {"brats": lambda src: write_nifti_case(src, "Good"),
               "kaggle-slices": lambda src: write_kaggle_volume(src, 1),
               "lgg": lambda src: write_lgg_patient(src, "TCGA_GG_0000_20000101", n_slices=4),
               "h5": lambda src: write_h5(os.path.join(src, "good.h5"), **dict(zip(("image", "mask"), good_arrays())))}


@pytest.mark.parametrize("kind", list(BAD_SOURCES))
def test_prepare_data_skips_a_bad_case_with_its_reason_and_goes_on(tmp_path, kind):
    layout, make_bad = BAD_SOURCES[kind]
    if layout in READERS:
        needs(READERS[layout])
    src = str(tmp_path / "src")
    os.makedirs(src)
    GOOD_SOURCE[layout](src)
    case_id, problem = make_bad(src)
    result = run_script("prepare_data.py", layout, src, tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    reasons = [line for line in result.stdout.splitlines() if line.strip().startswith("skipped ")]
    assert len(reasons) == 1 and reasons[0].strip().startswith(f"skipped {case_id}: {src}"), result.stdout
    assert problem in reasons[0], reasons[0]
    assert f"{layout}: wrote 1 cases" in result.stdout and "skipped 1" in result.stdout
    assert len(os.listdir(tmp_path / "out")) == 1


def test_missing_optional_reader_says_how_to_install(tmp_path):
    needs("nibabel")  # to write the case that it then cannot read
    write_nifti_case(tmp_path, "Case_1")
    code = ("import sys; sys.modules['nibabel'] = None; import prepare_data; "
            f"prepare_data.main(['brats', {str(tmp_path)!r}, {str(tmp_path / 'out')!r}])")
    assert_one_line_error(run_script("-c", code), "reading NIfTI needs nibabel: pip install -r requirements-extra.txt")


# ----------------------------------------------------------------------------------------- the matrix
# Every kind of bad input, through the real entry points (main.py, evaluate.py, prepare_data.py):
# each must exit non-zero with one line naming the file and the problem, and leave no partial output.

def read_only_folder(tmp_path):
    """A folder nothing can be written into, even as root (where chmod does not stop writes)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    os.chmod(folder, 0o555)
    if os.access(folder, os.W_OK):
        return "/sys/kernel"  # sysfs refuses new files even for root
    return str(folder)


def checkpoint_of(tmp_path, base_channels, weights_base):
    """A checkpoint whose config says `base_channels` but whose weights come from `weights_base`."""
    from config import Config, to_dict
    from model import UNet
    cfg = Config()
    cfg.model.base_channels, cfg.data.dir = base_channels, str(tmp_path / "data")
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": UNet(base_channels=weights_base, depth=3).state_dict(), "config": to_dict(cfg)}, path)
    return path


def corrupt_checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    return path


def train_on(make_bad):
    def case(tmp_path):
        write_blob_dataset(str(tmp_path / "data"), n_cases=3)
        bad = tmp_path / "data" / "case_bad.h5"
        make_bad(str(bad))
        return "main", ["--data.dir", tmp_path / "data", "--train.out_dir", tmp_path / "out"], str(bad)
    return case


def zero_size(path):
    write_h5(path, image=np.zeros((4, 0, 24, 22), np.float32), mask=np.zeros((0, 24, 22), np.uint8))


def empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    return "main", ["--data.dir", tmp_path / "data", "--train.out_dir", tmp_path / "out"], str(tmp_path / "data")


def non_h5_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "case_1.nii.gz").write_bytes(b"")
    return "main", ["--data.dir", tmp_path / "data", "--train.out_dir", tmp_path / "out"], str(tmp_path / "data")


def read_only_output(tmp_path):
    write_blob_dataset(str(tmp_path / "data"), n_cases=3)
    out = read_only_folder(tmp_path)
    return "main", ["--data.dir", tmp_path / "data", "--train.out_dir", out, "--train.name", "brats-run"], out


def wrong_model_shape(tmp_path):
    write_blob_dataset(str(tmp_path / "data"), n_cases=2)
    path = checkpoint_of(tmp_path, base_channels=8, weights_base=4)
    return "evaluate", ["--checkpoint", path, "--split", "all", "--out", tmp_path / "out"], str(path)


def corrupt_ckpt(tmp_path):
    write_blob_dataset(str(tmp_path / "data"), n_cases=2)
    path = corrupt_checkpoint(tmp_path)
    return "evaluate", ["--checkpoint", path, "--split", "all", "--out", tmp_path / "out"], str(path)


def missing_ckpt(tmp_path):
    return "evaluate", ["--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "out"], str(tmp_path / "nope.pt")


def prepare_truncated_nifti(tmp_path):
    needs("nibabel")
    src = tmp_path / "src"
    src.mkdir()
    bad_brats_truncated(str(src))
    return "prepare_data", ["brats", src, tmp_path / "out"], str(src / "Bad" / "Bad_t1.nii.gz")


MATRIX = {
    "truncated-h5": (train_on(truncated), "cannot be read as HDF5"),
    "not-hdf5": (train_on(not_hdf5), "cannot be read as HDF5"),
    "missing-key": (train_on(missing_key), "no dataset 'mask'; keys present"),
    "nan-image": (train_on(nan_image), "NaN/Inf"),
    "shape-mismatch": (train_on(shape_mismatch), "they must match"),
    "unknown-label": (train_on(bad_labels), "label values [3]"),
    "wrong-channels": (train_on(wrong_channels), "image has 3 channels"),
    "zero-size": (train_on(zero_size), "zero size"),
    "empty-folder": (empty_folder, "no .h5 case files found (empty)"),
    "non-h5-file": (non_h5_file, "no .h5 case files found (found e.g. ['case_1.nii.gz'])"),
    "read-only-output": (read_only_output, "cannot"),
    "checkpoint-other-model": (wrong_model_shape, "weights do not fit the configured model"),
    "corrupt-checkpoint": (corrupt_ckpt, "not a loadable checkpoint"),
    "missing-checkpoint": (missing_ckpt, "checkpoint not found"),
    "truncated-nifti": (prepare_truncated_nifti, "cannot be read as NIfTI"),
}


def exit_message(entry, args):
    """Run an entry point's main() in-process (what its command line does) and return its exit message."""
    module = __import__(entry)
    with pytest.raises(SystemExit) as stop:
        module.main([str(a) for a in args])
    return stop.value.code


@pytest.mark.parametrize("kind", list(MATRIX))
def test_bad_input_matrix(tmp_path, capsys, kind):
    setup, problem = MATRIX[kind]
    entry, args, named = setup(tmp_path)
    message = exit_message(entry, args)
    if entry == "prepare_data":  # skips the bad case with its reason, exits 1
        assert message == 1
        message = [line.strip() for line in capsys.readouterr().out.splitlines() if "skipped Bad" in line][0]
    assert isinstance(message, str) and len(message.splitlines()) == 1, message
    assert named in message and problem in message, message
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))
