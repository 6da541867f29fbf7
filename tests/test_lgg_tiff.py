"""Predictions of Kaggle LGG cases written back in the dataset's own layout,
<patient>/<patient>_<n>_pred.tif (uint8 0/255, source slice size, source slice numbers), and read
back pixel for pixel."""
import glob
import os
import re

import numpy as np
import pytest
import torch

from cases.h5 import case_format, read_case
from cases.splits import list_cases
from config import build_config, check, to_dict
from conftest import ROOT, write_blob_dataset
from evaluate import evaluate_checkpoint
from evaluation.export import export_case
from evaluation.inference import predict_slices
from layout_fixtures import write_lgg_patient
from model import build_model
from prepare_data import main as prepare_main
from runtime.checkpoint import save_checkpoint

try:
    import tifffile
except ImportError:  # only the TIFF tests need it; they skip, the rest of the file runs
    tifffile = None
NEEDS_TIFFFILE = pytest.mark.skipif(tifffile is None, reason="TIFF tests need tifffile: pip install -r requirements-extra.txt")
REAL_LGG = os.path.join(ROOT, "..", "shared", "data", "lgg-sample", "kaggle_3m")
SOURCE_SLICE = re.compile(r"^(.+)_(\d+)\.tif$")


def source_numbers(folder):
    """The slice numbers <n> of a kaggle_3m patient folder's <patient>_<n>.tif images."""
    names = (SOURCE_SLICE.match(os.path.basename(p)) for p in glob.glob(os.path.join(folder, "*.tif")))
    return sorted(int(m.group(2)) for m in names if m and not m.group(0).endswith("_mask.tif"))


def bright_flair(image, context=0):
    """A known-answer prediction: tumour where the z-scored FLAIR is above its brain mean."""
    def predictor(batch):
        return (batch[:, 1:2] > 0).float() * 20 - 10
    return predict_slices(predictor, image, tuple(image.shape[2:]), batch_size=8).numpy() > 0.5


def read_back(folder, patient, numbers):
    return np.stack([tifffile.imread(os.path.join(folder, patient, f"{patient}_{n}_pred.tif")) for n in numbers])


def check_round_trip(kaggle_root, h5_dir, out_dir):
    """Every converted patient: known-answer prediction -> TIFFs -> read back equals it, names and shapes match."""
    fmt = case_format(build_config({"data.channels": "3"}).data)
    for path in list_cases(h5_dir):
        case = read_case(path, fmt)
        pred = bright_flair(case.image)
        export_case(str(out_dir), case, pred, predictions=True, overlay=False, regions={"tumour": (1,)})
        numbers = source_numbers(os.path.join(kaggle_root, case.case_id))
        written = sorted(os.listdir(out_dir / "predictions" / case.case_id))
        assert written == sorted(f"{case.case_id}_{n}_pred.tif" for n in numbers)
        back = read_back(out_dir / "predictions", case.case_id, numbers)
        assert back.dtype == np.uint8 and back.shape == pred[0].shape and set(np.unique(back)) <= {0, 255}
        assert np.array_equal(back == 255, pred[0])
        assert pred[0].any() and not pred[0].all()  # the comparison is not between two blank volumes


@NEEDS_TIFFFILE
def test_tiffs_take_the_source_slice_numbers(tmp_path):
    """A patient whose slice 3 is missing keeps its numbers 1, 2, 4, 5, ... in the predictions."""
    patient = "TCGA_ZZ_0001_20020202"
    folder = write_lgg_patient(str(tmp_path), patient, n_slices=7, size=32, seed=3)
    for suffix in (".tif", "_mask.tif"):
        os.remove(os.path.join(folder, f"{patient}_3{suffix}"))
    prepare_main(["lgg", str(tmp_path / "kaggle_3m"), str(tmp_path / "h5")])
    assert read_case(str(tmp_path / "h5" / f"{patient}.h5"), case_format(build_config(
        {"data.channels": "3"}).data)).attrs["slice_numbers"] == [1, 2, 4, 5, 6, 7]
    check_round_trip(str(tmp_path / "kaggle_3m"), str(tmp_path / "h5"), tmp_path / "out")


def test_other_cases_get_no_tiffs(tmp_path):
    fmt = case_format(build_config({}).data)
    path = write_blob_dataset(str(tmp_path / "h5"), n_cases=1)[0]
    case = read_case(path, fmt)
    written = export_case(str(tmp_path), case, np.zeros((3, *case.mask.shape), bool), overlay=False)
    assert [os.path.basename(p) for p in written] == [f"{case.case_id}.h5"]


@NEEDS_TIFFFILE
@pytest.mark.skipif(not os.path.isdir(REAL_LGG), reason=f"real LGG sample not found at {REAL_LGG}")
def test_real_patients_round_trip_through_tiffs(tmp_path):
    prepare_main(["lgg", REAL_LGG, str(tmp_path / "h5")])
    check_round_trip(REAL_LGG, str(tmp_path / "h5"), tmp_path / "out")


@NEEDS_TIFFFILE
@pytest.mark.skipif(not os.path.isdir(REAL_LGG), reason=f"real LGG sample not found at {REAL_LGG}")
def test_evaluate_save_predictions_writes_the_kaggle_layout(tmp_path):
    """evaluate.py --save-predictions with a tiny (untrained) 2.5D model: the TIFFs of every patient
    hold exactly the .h5 label map written beside them, at 256x256 with the source's slice numbers."""
    import h5py

    h5_dir = str(tmp_path / "h5")
    prepare_main(["lgg", REAL_LGG, h5_dir])
    cfg = check(build_config({"data.dir": h5_dir, "data.image_size": "32,32", "model.base_channels": "4",
                              "model.depth": "2", "data.slice_context": "1", "model.in_channels": "9"},
                             preset="lgg2d"))
    torch.manual_seed(0)
    checkpoint = str(tmp_path / "run" / "best.pt")
    save_checkpoint(checkpoint, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)})
    evaluate_checkpoint(checkpoint, "all", str(tmp_path / "eval"), {"eval.threshold": "0.5"},
                        save_predictions=True)
    folder = tmp_path / "eval" / "predictions"
    for patient in sorted(os.listdir(REAL_LGG)):
        if not os.path.isdir(os.path.join(REAL_LGG, patient)):
            continue
        numbers = source_numbers(os.path.join(REAL_LGG, patient))
        with h5py.File(folder / f"{patient}.h5") as f:
            labels = f["mask"][()]
        back = read_back(folder, patient, numbers)
        assert back.shape == labels.shape == (len(numbers), 256, 256)
        assert np.array_equal(back, labels * np.uint8(255))
