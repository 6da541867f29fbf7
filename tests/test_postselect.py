"""Postprocessing chosen on the validation cases: kept where it helps most cases, refused where it
loses, where it helps only the mean, or where it deletes a tumour the network found; stored in
best.pt, applied at evaluation unless a key given there overrides it."""
import json
import os

import numpy as np
import pytest
import torch

from cases.h5 import write_case
from config import Config, build_config, to_dict
from conftest import SHAPE, TumourDetector, bright_case
from evaluate import evaluate_checkpoint
from evaluation.postprocess import label_map_regions, remove_small_tumours, tumour_probability
from evaluation.postselect import (
    Prediction,
    _choose_and_store,
    candidate_steps,
    choose_postprocessing,
    improves,
    predict_cases,
    settings_of,
    stored_config,
    user_set_postprocessing_keys,
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


def prediction(case_id, truth_boxes, pred_boxes, regions=1):
    """A hand-made validation prediction: truth boxes, and (box, probability) boxes predicted; with
    3 regions every region is the same (a tumour labelled ET)."""
    truth, probs = np.zeros(SHAPE, bool), np.zeros(SHAPE, np.float32)
    for box in truth_boxes:
        truth[box] = True
    for box, p in pred_boxes:
        probs[box] = p
    probs = np.repeat(probs[None], regions, 0)
    return Prediction(case_id, probs > 0.5, np.repeat(truth[None], regions, 0), (1.0, 1.0, 1.0),
                      tumour_probability(probs)[None])


TUMOUR, SMALL, FAR = np.s_[4:8, 5:9, 3:7], np.s_[1:3, 1:3, 1:3], np.s_[9:12, 10:13, 7:10]   # 64, 8, 27 voxels
STRAY = np.s_[1, 1, 1]
UNSURE = {"eval.unsure_component_voxels": 30, "eval.unsure_component_peak": 0.9}


def binary_cfg():
    cfg = Config()
    cfg.data.task = "binary"
    return cfg


def test_removing_an_unsure_stray_component_wins_and_is_chosen():
    cfg = Config()
    predictions = [prediction(f"s{i}", [TUMOUR], [(TUMOUR, 0.99), (STRAY, 0.6)], regions=3) for i in range(2)]
    report = choose_postprocessing(predictions, cfg)
    assert report["chosen"]["eval.unsure_component_voxels"] > 1 and report["chosen"]["eval.unsure_component_peak"] > 0.6
    assert report["chosen"]["eval.postprocess_et_min"] == 0    # turning 64 ET voxels to necrosis loses
    assert report["baseline"]["dice"]["WT"] < 1.0 and report["result"]["dice"] == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert report["result"]["mean_hd95"] <= report["baseline"]["mean_hd95"]
    assert report["cases"] == 2 and report["trials"]
    adopted = [t for t in report["trials"] if t["refused"] is None]
    assert adopted and all(t["cases_improved"] == 2 and t["cases_worsened"] == 0 for t in adopted)


def test_a_confident_stray_goes_only_as_a_minor_share_of_the_tumour():
    """A stray the network is sure of (peak 0.99, as the real false positives far from the tumour are)
    survives the unsure rule; it holds 1/64 of the tumour's probability mass, so the minor rule takes it."""
    predictions = [prediction(f"s{i}", [TUMOUR], [(TUMOUR, 0.99), (STRAY, 0.99)], regions=3) for i in range(2)]
    report = choose_postprocessing(predictions, Config())
    assert report["chosen"]["eval.unsure_component_voxels"] == 0 and report["baseline"]["dice"]["WT"] < 1.0
    assert 1 / 64 < report["chosen"]["eval.minor_component_share"] and report["result"]["dice"]["WT"] == 1.0
    alone = choose_postprocessing(predictions, Config(), steps=candidate_steps("brats")[:1])
    assert alone["chosen"] == settings_of(Config().eval)  # the unsure rule alone never removes it


def test_automatic_choice_no_longer_offers_keep_the_largest():
    for task in ("brats", "binary"):
        offered = {key for _, options in candidate_steps(task) for option in options for key in option}
        assert "eval.largest_component" not in offered and "eval.unsure_component_voxels" in offered


def test_a_large_unsure_false_positive_does_not_cost_a_smaller_sure_tumour():
    """Case c: an 8-voxel tumour the network is sure of, and a 27-voxel false positive it doubts.
    Keep-the-largest helps cases a and b and the mean, but keeps c's false positive and loses its
    tumour: the guard refuses it. The unsure-component rule removes every false positive and keeps c's tumour."""
    twenty = np.s_[1:3, 1:6, 1:3]
    cases = [prediction(cid, [FAR], [(FAR, 0.99), (twenty, 0.6)]) for cid in ("a", "b")]
    cases.append(prediction("c", [SMALL], [(SMALL, 0.97), (FAR, 0.6)]))
    largest = choose_postprocessing(cases, binary_cfg(), steps=[("largest", [{"eval.largest_component": True}])])
    trial = largest["trials"][0]
    assert improves(trial, largest["baseline"]) and (trial["cases_improved"], trial["cases_worsened"]) == (2, 1)
    assert trial["detections_lost"] == ["c"] and "found tumour" in trial["refused"]
    assert not largest["chosen"]["eval.largest_component"]
    report = choose_postprocessing(cases, binary_cfg())
    assert report["chosen"]["eval.unsure_component_voxels"] > 27 and report["result"]["dice"] == {"tumour": 1.0}
    kept = label_map_regions(cases[2].pred, "binary", stored_config({"config": to_dict(binary_cfg()),
                                                                   "postprocessing": report["chosen"]}).eval,
                             cases[2].probs)
    assert kept[0][SMALL].all() and not kept[0][FAR].any()


def test_an_option_that_raises_the_mean_but_worsens_most_cases_is_not_adopted():
    """Removing small unsure components cures case a (+0.63) but drops a true satellite lesion the
    network doubted in b and c (-0.13 each): the mean rises, two cases of three get worse."""
    cases = [prediction("a", [SMALL], [(SMALL, 0.97), (FAR, 0.6)])]
    cases += [prediction(cid, [FAR, SMALL], [(FAR, 0.99), (SMALL, 0.6)]) for cid in ("b", "c")]
    report = choose_postprocessing(cases, binary_cfg(), steps=[("components", [UNSURE])])
    trial = report["trials"][0]
    assert improves(trial, report["baseline"]) and trial["mean_dice"] > report["baseline"]["mean_dice"] + 0.05
    assert (trial["cases_improved"], trial["cases_worsened"]) == (1, 2) and "worsen" in trial["refused"]
    assert trial["detections_lost"] == [] and report["chosen"] == settings_of(Config().eval)


def test_the_detection_guard_refuses_an_option_that_deletes_a_found_tumour():
    """Cases a and c improve a lot; in b the only tumour found is small and doubted: removing it
    turns Dice 1 into 0. Mean and majority say yes; the guard says no."""
    cases = [prediction(cid, [SMALL], [(SMALL, 0.97), (FAR, 0.6)]) for cid in ("a", "c")]
    cases.insert(1, prediction("b", [SMALL], [(SMALL, 0.6)]))
    report = choose_postprocessing(cases, binary_cfg(), steps=[("components", [UNSURE])])
    trial = report["trials"][0]
    assert improves(trial, report["baseline"]) and (trial["cases_improved"], trial["cases_worsened"]) == (2, 1)
    assert trial["detections_lost"] == ["b"] and "found tumour" in trial["refused"]
    assert report["chosen"] == settings_of(Config().eval) and report["result"] == report["baseline"]


def scores(wt, tc, hd95=1.0):
    return {"dice": {"WT": wt, "TC": tc}, "mean_dice": (wt + tc) / 2, "hd95": {"WT": hd95, "TC": hd95},
            "mean_hd95": hd95}


def test_validation_cases_are_predicted_at_the_models_own_spacing(tmp_path):
    cfg = detector_cfg()
    cfg.data.mode, cfg.data.patch_size, cfg.data.spacing = "patch", (8, 8, 8), (2.0, 2.0, 2.0)
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), False), cfg, CPU)
    assert [p.pred.shape for p in predictions] == [(3, *SHAPE)] * 2  # back at each case's native grid
    assert [p.probs.shape for p in predictions] == [(1, *SHAPE)] * 2
    assert all(((p.probs > 0.5) == p.pred.any(0)).all() for p in predictions)


@pytest.mark.parametrize("new, kept", [
    (scores(0.9, 0.8), True),                     # the mean rises, no region falls
    (scores(0.95, 0.69), False),                  # the mean rises, but TC falls
    (scores(0.8, 0.7, hd95=0.5), True),           # same Dice, lower HD95 (a far stray voxel gone)
    (scores(0.8, 0.7), False),                    # nothing changes
])
def test_a_candidate_is_kept_only_when_it_improves(new, kept):
    assert improves(new, scores(0.8, 0.7)) is kept


def test_removing_a_true_lesion_loses_and_nothing_is_chosen():
    predictions = [prediction(f"s{i}", [TUMOUR, STRAY], [(TUMOUR, 0.99), (STRAY, 0.6)], regions=3) for i in range(2)]
    report = choose_postprocessing(predictions, Config())
    assert report["chosen"] == settings_of(Config().eval)     # everything stays off
    assert report["result"] == report["baseline"] and report["baseline"]["mean_dice"] == 1.0
    assert all(t["mean_dice"] < 1.0 for t in report["trials"] if t["step"] == "tumour components"
               and t["settings"]["eval.unsure_component_voxels"] > 1)


def test_keys_the_user_set_are_not_searched(tmp_path):
    cfg = detector_cfg(min_component_voxels=0, postprocess_et_min=7)
    assert user_set_postprocessing_keys(cfg) == ["eval.postprocess_et_min"]
    cfg.eval.largest_component = True
    predictions = predict_cases(TumourDetector(), write_cases(str(tmp_path), False), cfg, CPU)
    report = choose_postprocessing(predictions, cfg, fixed=user_set_postprocessing_keys(cfg))
    assert report["chosen"]["eval.postprocess_et_min"] == 7 and report["chosen"]["eval.largest_component"]
    assert not any(set(t["settings"]) & {"eval.largest_component", "eval.postprocess_et_min"}
                   for t in report["trials"])
    cfg.eval.unsure_component_voxels = 100
    fixed = user_set_postprocessing_keys(cfg)
    assert "eval.unsure_component_voxels" in fixed
    assert not [t for t in choose_postprocessing(predictions, cfg, fixed=fixed)["trials"] if t["step"] == "tumour components"]


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
    # the untrained UNet wins nothing; predictions with an unsure stray voxel stand in for it
    monkeypatch.setattr("evaluation.postselect.predict_cases", lambda model, p, cfg, device: [
        prediction(f"s{i}", [TUMOUR], [(TUMOUR, 0.99), (STRAY, 0.6)], regions=3) for i in range(len(p))])
    report = _choose_and_store(best, paths, folder, CPU)
    state = load_checkpoint(best)
    written = json.load(open(tmp_path / "postprocessing.json"))
    assert state["postprocessing"] == report["chosen"] == written["chosen"] and "model" in state
    assert {"cases_improved", "cases_worsened", "detections_lost", "refused"} <= set(written["trials"][0])
    assert state["postprocessing"]["eval.unsure_component_voxels"] > 1
    assert stored_config(state).eval.unsure_component_peak > 0.6
    assert load_checkpoint(best)["config"]["eval"]["unsure_component_voxels"] == 0
    summary = evaluate_checkpoint(best, "all", str(tmp_path / "new"))   # the rule reads the probabilities
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
                                            "eval.unsure_component_voxels": 0, "eval.unsure_component_peak": 0.0,
                                            "eval.minor_component_share": 0.0, "eval.postprocess_et_min": 300}


def test_no_validation_cases_or_switched_off_chooses_nothing(tmp_path):
    best = tiny_checkpoint(str(tmp_path))
    assert _choose_and_store(best, [], str(tmp_path), CPU) is None
    assert "postprocessing" not in load_checkpoint(best) and not os.path.exists(tmp_path / "postprocessing.json")


@pytest.mark.parametrize("task", ["binary"])
def test_binary_tasks_search_only_components(task):
    assert [name for name, _ in candidate_steps(task)] == ["tumour components", "minor components"]
