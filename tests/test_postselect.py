"""Postprocessing chosen on the validation cases: kept where it wins, refused where it loses,
stored in best.pt, applied at evaluation unless a key given there overrides it."""
import json
import os

import numpy as np
import pytest
import torch

from cases.h5 import write_case
from config import Config, build_config, to_dict
from conftest import SHAPE, TumourDetector, bright_case
from evaluate import evaluate_checkpoint
from evaluation.postprocess import label_map_regions, remove_small_tumours
from evaluation.postselect import (
    _choose_and_store,
    choose,
    explicit_keys,
    improves,
    predict_cases,
    settings_of,
    stored_config,
)
from model import build_model
from runtime.checkpoint import load_checkpoint, save_checkpoint

CPU = torch.device("cpu")


def detector_cfg(**eval_keys):
    cfg = Config()
    cfg.train.amp = False
    cfg.data.image_size = SHAPE  # the native grid: resize is the identity
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    return cfg


def write_cases(folder, stray_is_tumour, n=2):
    """Cases with the bright voxel at (1, 1, 1) that TumourDetector also finds: a false positive,
    or (stray_is_tumour) a true second lesion that removing small components would lose."""
    paths = []
    for i in range(n):
        case = bright_case(f"s{i}", stray=True)
        if stray_is_tumour:
            case.mask[1, 1, 1] = 4
        paths.append(write_case(os.path.join(folder, f"s{i}.h5"), case.image, case.mask))
    return paths


def test_small_tumour_components_are_removed_with_their_labels():
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:8, 5:9, 3:7] = 2
    labels[5:7, 6:8, 4:6] = 4
    labels[0, 0, 0:3] = 4                          # a 3-voxel component
    out = remove_small_tumours(labels, 4)
    assert not out[0, 0].any() and (out[4:8, 5:9, 3:7] == labels[4:8, 5:9, 3:7]).all()
    assert (remove_small_tumours(labels, 3) == labels).all() and (remove_small_tumours(labels, 0) == labels).all()
    cfg = detector_cfg(min_component_voxels=4).eval   # driven by eval.min_component_voxels in label space
    regions = label_map_regions(np.stack([labels > 0, labels == 4, labels == 4]), "brats", cfg)
    assert not regions[:, 0, 0].any() and regions[0].sum() == 64


def test_removing_a_spurious_component_wins_and_is_chosen(tmp_path):
    cfg = detector_cfg()
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), False), cfg, CPU)
    report = choose(predictions, cfg)
    assert report["chosen"]["eval.largest_component"] or report["chosen"]["eval.min_component_voxels"] > 1
    assert report["chosen"]["eval.postprocess_et_min"] == 0    # turning 65 ET voxels to necrosis loses
    assert report["baseline"]["dice"]["WT"] < 1.0 and report["result"]["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert report["result"]["mean_hd95"] <= report["baseline"]["mean_hd95"]
    assert report["cases"] == 2 and report["trials"]


def scores(wt, tc, hd95=1.0):
    return {"dice": {"WT": wt, "TC": tc}, "mean_dice": (wt + tc) / 2, "hd95": {"WT": hd95, "TC": hd95},
            "mean_hd95": hd95}


def test_validation_cases_are_predicted_at_the_models_own_spacing(tmp_path):
    cfg = detector_cfg()
    cfg.data.mode, cfg.data.patch_size, cfg.data.spacing = "patch", (8, 8, 8), (2.0, 2.0, 2.0)
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), False), cfg, CPU)
    assert [p.pred.shape for p in predictions] == [(3, *SHAPE)] * 2  # back at each case's native grid


@pytest.mark.parametrize("new, kept", [
    (scores(0.9, 0.8), True),                     # the mean rises, no region falls
    (scores(0.95, 0.69), False),                  # the mean rises, but TC falls
    (scores(0.8, 0.7, hd95=0.5), True),           # same Dice, lower HD95 (a far stray voxel gone)
    (scores(0.8, 0.7), False),                    # nothing changes
])
def test_a_candidate_is_kept_only_when_it_improves(new, kept):
    assert improves(new, scores(0.8, 0.7)) is kept


def test_removing_a_true_lesion_loses_and_nothing_is_chosen(tmp_path):
    cfg = detector_cfg()
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), True), cfg, CPU)
    report = choose(predictions, cfg)
    assert report["chosen"] == settings_of(Config().eval)     # everything stays off
    assert report["result"] == report["baseline"] and report["baseline"]["mean_dice"] == 1.0
    assert all(t["mean_dice"] < 1.0 for t in report["trials"] if t["step"] == "tumour components")


def test_keys_the_user_set_are_not_searched(tmp_path):
    cfg = detector_cfg(min_component_voxels=0, postprocess_et_min=7)
    assert explicit_keys(cfg) == ["eval.postprocess_et_min"]
    cfg.eval.largest_component = True
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), False), cfg, CPU)
    report = choose(predictions, cfg, fixed=explicit_keys(cfg))
    assert report["chosen"]["eval.postprocess_et_min"] == 7 and report["chosen"]["eval.largest_component"]
    assert not any(set(t["settings"]) & {"eval.largest_component", "eval.postprocess_et_min"}
                   for t in report["trials"])


def tiny_checkpoint(folder, postprocessing=None):
    """best.pt of an untrained tiny UNet on the bright cases' grid, with or without a stored choice."""
    cfg = build_config({"model.base_channels": "2", "model.depth": "1", "train.amp": "false",
                        "data.image_size": ",".join(map(str, SHAPE)), "data.dir": folder})
    torch.manual_seed(0)
    state = {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}
    if postprocessing is not None:
        state["postprocessing"] = postprocessing
    path = os.path.join(folder, "best.pt")
    save_checkpoint(path, state)
    return path


def test_the_choice_is_stored_in_best_pt_and_applied_at_evaluation(tmp_path, monkeypatch):
    folder = str(tmp_path)
    paths = write_cases(folder, False)
    best = tiny_checkpoint(folder)
    old = evaluate_checkpoint(best, "all", str(tmp_path / "old"))   # a checkpoint without a choice loads
    assert old["postprocessing"] == settings_of(Config().eval)
    # the untrained UNet wins nothing; the detector's predictions stand in for it
    monkeypatch.setattr("evaluation.postselect.predict_cases", lambda model, p, cfg, device: predict_cases(
        TumourDetector(), p, detector_cfg(), device))
    report = _choose_and_store(best, paths, folder, CPU)
    state = load_checkpoint(best)
    assert state["postprocessing"] == report["chosen"] == json.load(open(tmp_path / "postprocessing.json"))["chosen"]
    assert state["postprocessing"]["eval.largest_component"] and "model" in state
    assert stored_config(state).eval.largest_component and not load_checkpoint(best)["config"]["eval"]["largest_component"]
    summary = evaluate_checkpoint(best, "all", str(tmp_path / "new"))
    assert summary["postprocessing"] == report["chosen"]


def test_a_key_given_at_evaluation_overrides_the_stored_choice(tmp_path):
    folder = str(tmp_path)
    write_cases(folder, False, n=1)
    best = tiny_checkpoint(folder, {"eval.largest_component": True, "eval.min_component_voxels": 0,
                                    "eval.postprocess_et_min": 300})
    stored = evaluate_checkpoint(best, "all", str(tmp_path / "a"))
    assert stored["postprocessing"]["eval.largest_component"] and stored["postprocessing"]["eval.postprocess_et_min"] == 300
    overridden = evaluate_checkpoint(best, "all", str(tmp_path / "b"), overrides={"eval.largest_component": "false"})
    assert overridden["postprocessing"] == {"eval.largest_component": False, "eval.min_component_voxels": 0,
                                            "eval.postprocess_et_min": 300}


def test_no_validation_cases_or_switched_off_chooses_nothing(tmp_path):
    best = tiny_checkpoint(str(tmp_path))
    assert _choose_and_store(best, [], str(tmp_path), CPU) is None
    assert "postprocessing" not in load_checkpoint(best) and not os.path.exists(tmp_path / "postprocessing.json")


@pytest.mark.parametrize("task", ["binary"])
def test_binary_tasks_search_only_components(task):
    from evaluation.postselect import candidate_steps
    assert [name for name, _ in candidate_steps(task)] == ["tumour components"]
