"""predict.py and ensemble.py: raw cases in, label maps on the source grid out; several checkpoints
average their probabilities; bad and misregistered cases are refused one line each."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cases.geometry import to_original_grid
from config import Config, build_config, to_dict
from conftest import ROOT, SHAPE, TumourDetector, bright_case, write_blob_dataset
from evaluation.checkpoints import Member, checkpoint_files, load_members
from evaluation.ensemble import evaluate_ensemble_case, predict_probabilities
from evaluation.inference import predict_case
from evaluation.postprocess import label_map_regions, to_label_map
from layout_fixtures import AFFINE, write_nifti_case
from model import build_model
from predict import predict_all
from real_brats import BRATS_SAMPLE, SKIP_REASON, sample_cases, source_seg_path
from runtime.checkpoint import save_checkpoint

try:
    import nibabel as nib
except ImportError:  # only the NIfTI tests need it; they skip, the rest of the file runs
    nib = None
NEEDS_NIBABEL = pytest.mark.skipif(nib is None, reason="NIfTI tests need nibabel: pip install -r requirements-extra.txt")
CPU = torch.device("cpu")
TINY = {"data.image_size": "16", "model.base_channels": "4", "model.depth": "2"}


def tiny_checkpoint(path, seed=0, head_bias=None, **keys):
    """An untrained tiny model saved as main.py saves one (weights + resolved config); `head_bias`
    (one logit per region) makes its answer known: a large bias decides every voxel."""
    cfg = build_config({**TINY, **keys})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if head_bias is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor(head_bias, dtype=torch.float32))
    save_checkpoint(str(path), {"model": model.state_dict(), "config": to_dict(cfg), "epoch": 0})
    return str(path)


def run_predict(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)


class ConstantModel(torch.nn.Module):
    """Every voxel of every region gets logit `logit`, whatever the input."""

    def __init__(self, logit, regions=3):
        super().__init__()
        self.logit, self.regions = logit, regions

    def forward(self, x):
        return torch.full((x.shape[0], self.regions, *x.shape[2:]), float(self.logit))


def member(model, mode="resize", **eval_keys):
    cfg = Config()
    cfg.data.mode, cfg.data.image_size, cfg.data.patch_size = mode, SHAPE, (8, 8, 8)
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    return Member("known", model, cfg, None, CPU)


def test_ensemble_thresholds_the_mean_of_members_with_different_configs():
    """logit -0.847 is p 0.3, logit 1.386 is p 0.8: alone one predicts nothing and one everything;
    their mean 0.55 passes a 0.5 threshold and fails a 0.6 one. (The patch member predicts the
    whole grid, not only the brain's box, so that every voxel holds the constant.)"""
    low, high = member(ConstantModel(-0.8473), "patch", crop_nonzero=False), member(ConstantModel(1.3863))
    mean = predict_probabilities([low, high], bright_case(), CPU)
    assert torch.allclose(mean, torch.full((3, *SHAPE), 0.55), atol=1e-4)
    coarse = member(TumourDetector(), "patch")
    coarse.cfg.data.spacing = (2.0, 2.0, 2.0)  # a member trained at another spacing predicts at its own
    assert predict_probabilities([coarse], bright_case(), CPU).shape == (3, *SHAPE)
    assert evaluate_ensemble_case([low, high], bright_case(with_mask=False), CPU).pred.all()
    strict = member(ConstantModel(-0.8473), "patch", threshold=0.6, crop_nonzero=False)  # the first member's eval keys decide
    assert not evaluate_ensemble_case([strict, high], bright_case(with_mask=False), CPU).pred.any()
    detector = evaluate_ensemble_case([member(TumourDetector()), member(TumourDetector(), "patch")], bright_case(), CPU)
    assert detector.scores["WT"]["dice"] == 1.0


@NEEDS_NIBABEL
def test_two_checkpoints_predict_the_thresholded_mean_of_their_probabilities(tmp_path):
    write_nifti_case(str(tmp_path / "in"), "Case_1")
    first = tiny_checkpoint(tmp_path / "a" / "best.pt", seed=1)
    second = tiny_checkpoint(tmp_path / "b" / "best.pt", seed=2, **{"data.mode": "patch", "data.patch_size": "8"})
    result = run_predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-c", first, "-c", tmp_path / "b",
                         "--no-overlays", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    written = np.asarray(nib.load(tmp_path / "out" / "Case_1.nii.gz").dataobj)
    from conversion import nifti
    case = nifti.read_brats(str(tmp_path / "in" / "Case_1"), with_mask=False)
    members = load_members([first, second], CPU)
    each = [predict_case(m.model, case.image, m.cfg, CPU, m.amp_dtype) for m in members]

    def exported(probs):
        regions = label_map_regions((probs > 0.5).numpy(), "brats", members[0].cfg.eval)
        return to_original_grid(to_label_map(regions, "brats"), case.attrs)

    assert np.array_equal(written, exported((each[0] + each[1]) / 2))
    assert not np.array_equal(exported(each[0]), exported(each[1]))  # the members disagree: the mean decides
    rows = list(csv.DictReader(open(tmp_path / "out" / "confidence.csv")))
    assert [r["case"] for r in rows] == ["Case_1"] and 0 <= float(rows[0]["confidence"]) < 1


def test_members_that_disagree_make_a_case_less_confident(tmp_path):
    """Two detectors agree on the tumour; a member that calls every voxel tumour does not: the
    mean is as sure of the tumour, but the members' agreement (and so the confidence) falls."""
    case = bright_case("c0", with_mask=False)
    cases = [("c0", "c0.h5", lambda: case)]
    agree = [member(TumourDetector()), member(TumourDetector())]
    disagree = [member(TumourDetector()), member(ConstantModel(9.0))]
    failed, sure = predict_all(agree, cases, str(tmp_path / "a"), overlays=False)
    _, unsure = predict_all(disagree, cases, str(tmp_path / "b"), overlays=False)
    assert failed == [] and sure["c0"] == pytest.approx(1.0, abs=1e-3)
    tumour, grid = 4 * 4 * 4, np.prod(SHAPE)
    # the mean: 1 on the tumour, 0.5 elsewhere (masked out): soft Dice 2t / (2t + (grid - t) / 2);
    # the members' masks, tumour and everything: Dice 2t / (t + grid)
    consistency, agreement = 2 * tumour / (2 * tumour + (grid - tumour) / 2), 2 * tumour / (tumour + grid)
    assert unsure["c0"] == pytest.approx(consistency * agreement, rel=0.01) and unsure["c0"] < 0.02
    _, alone = predict_all(disagree[1:], cases, str(tmp_path / "c"), overlays=False)
    assert alone["c0"] == pytest.approx(1.0, abs=1e-3)   # one member, sure of everything: nothing to compare


@NEEDS_NIBABEL
@pytest.mark.skipif(not sample_cases(), reason=SKIP_REASON)
def test_real_brats_sample_predicts_onto_each_source_seg_grid(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "run" / "best.pt")
    result = run_predict("-i", BRATS_SAMPLE, "-o", tmp_path / "out", "-c", tmp_path / "run", "--no-overlays")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [f"{c}.nii.gz" for c in sample_cases()] + ["confidence.csv"]
    for case_id in sample_cases():
        written, source = nib.load(tmp_path / "out" / f"{case_id}.nii.gz"), nib.load(source_seg_path(case_id))
        assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
        for form in ("qform", "sform"):  # the header declares the same space as the source's
            assert int(written.header[f"{form}_code"]) == int(source.header[f"{form}_code"])
        assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert checkpoint_files(str(tmp_path / "run")) == [checkpoint]


@NEEDS_NIBABEL
@pytest.mark.parametrize("convention, enhancing", [("2018", 4), ("2023", 3)])
def test_labels_follow_the_input_naming_and_overlays_are_drawn(tmp_path, convention, enhancing):
    write_nifti_case(str(tmp_path / "in" / "HGG"), "Case_1", convention=convention)  # nested one level
    checkpoint = tiny_checkpoint(tmp_path / "best.pt", head_bias=[9.0, 9.0, 9.0])  # ET everywhere
    result = run_predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-c", checkpoint)
    assert result.returncode == 0, result.stderr
    written = nib.load(tmp_path / "out" / "Case_1.nii.gz")
    assert written.shape == (20, 22, 18) and np.array_equal(written.affine, AFFINE)
    inside = np.asarray(written.dataobj)[written.get_fdata() > 0]
    assert inside.size and set(np.unique(inside).tolist()) == {enhancing}
    assert os.path.getsize(tmp_path / "out" / "overlays" / "Case_1.png") > 0


def test_h5_cases_are_predicted_to_h5_label_maps(tmp_path):
    write_blob_dataset(str(tmp_path / "in"), n_cases=2)
    result = run_predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-c", tiny_checkpoint(tmp_path / "best.pt"),
                         "--no-overlays")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["case_000.h5", "case_001.h5", "confidence.csv"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "confidence.csv")))
    assert [r["case"] for r in rows] == ["case_000", "case_001"] and all(0 <= float(r["confidence"]) <= 1 for r in rows)
    assert "least confident cases" in result.stderr


def misregistered_t1(folder):
    path = os.path.join(folder, "Bad_t1.nii.gz")
    image = nib.load(path)
    shifted = image.affine.copy()
    shifted[0, 3] += 50.0  # 50 mm to the side: no longer on the FLAIR's grid
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), path)
    return "Bad_t1.nii.gz: affine differs from", "origin 50.0 mm apart"


def truncated_t1(folder):
    path = os.path.join(folder, "Bad_t1.nii.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    return "Bad_t1.nii.gz: cannot be read as NIfTI", ""


@NEEDS_NIBABEL
@pytest.mark.parametrize("spoil", [misregistered_t1, truncated_t1])
def test_a_bad_case_is_skipped_in_one_line_and_the_others_are_predicted(tmp_path, spoil):
    write_nifti_case(str(tmp_path / "in"), "Good")
    folder, _, _ = write_nifti_case(str(tmp_path / "in"), "Bad", seed=1)
    problem, detail = spoil(folder)
    result = run_predict("-i", tmp_path / "in", "-o", tmp_path / "out", "-c", tiny_checkpoint(tmp_path / "best.pt"),
                         "--no-overlays")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["Good.nii.gz", "confidence.csv"]
    assert [r["case"] for r in csv.DictReader(open(tmp_path / "out" / "confidence.csv"))] == ["Good"]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if problem in line]
    assert len(lines) == 2 and all(detail in line for line in lines), result.stdout + result.stderr  # log + summary
    assert "predicted 1 of 2 cases" in result.stdout


@NEEDS_NIBABEL
def test_prepare_data_refuses_modalities_that_are_not_coregistered(tmp_path, capsys):
    import prepare_data
    write_nifti_case(str(tmp_path / "src"), "Good")
    folder, _, _ = write_nifti_case(str(tmp_path / "src"), "Bad")
    problem, detail = misregistered_t1(folder)
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["brats", str(tmp_path / "src"), str(tmp_path / "out")])
    assert stop.value.code == 1 and os.listdir(tmp_path / "out") == ["Good.h5"]
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped Bad:" in line]
    assert len(skipped) == 1 and problem in skipped[0] and detail in skipped[0]


def test_a_missing_checkpoint_or_input_is_one_line(tmp_path):
    missing = run_predict("-i", tmp_path, "-o", tmp_path / "out", "-c", tmp_path / "nowhere.pt")
    assert missing.returncode != 0 and "nowhere.pt: checkpoint not found" in missing.stderr
    empty = run_predict("-i", tmp_path, "-o", tmp_path / "out", "-c", tiny_checkpoint(tmp_path / "best.pt"))
    assert empty.returncode != 0 and "no BraTS case folders" in empty.stderr and "Traceback" not in empty.stderr
