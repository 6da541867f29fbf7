"""Postprocessing chosen on the validation cases after training, as nnU-Net chooses it.

Each validation case is predicted once with best.pt and its thresholded regions and tumour
probability kept in memory; every candidate postprocessing (postprocess.py's label-space operations,
set by eval.* keys; the options are config.POSTSELECT's) is then tried on them and scored per case:
Dice per region from voxel counts and, for BraTS, HD95. The candidates are tried one step at a time,
greedily, each step on top of what earlier steps kept:
  1. tumour components: remove a component only when it is small AND the network was unsure of it
     (eval.unsure_component_voxels with eval.unsure_component_peak), the cure for a stray false
     positive that never deletes a tumour the network is sure of. Keeping only the largest component
     is not offered: on a case whose false positive outgrows the tumour it keeps the false positive;
  2. minor components: remove every component holding less than a share of the largest component's
     probability mass (eval.minor_component_share): the cure for the confident false positives far
     from the tumour that step 1 cannot touch (they peak at 0.99 like the tumour);
  3. BraTS only: a small predicted ET becomes necrosis (eval.postprocess_et_min).
An option is adopted only when it helps most cases, not only the mean: no region's mean Dice falls,
the mean Dice over regions rises (or stays while the mean HD95 falls: nnU-Net's rule), more cases
improve than worsen (per-case mean Dice over regions, HD95 deciding a tie), and no case where the
network found the tumour before the search (sensitivity of the first region, WT or tumour, at least
DETECTED) ends with that region's Dice under half of what it was then. Keys the user set away
from their defaults are not searched, and the search starts from them.
Under cross-validation (data.folds K, data.fold all) the choice is made once, on every fold's
validation cases pooled (choose_for_folds), so it rests on every case outside the test split.
The chosen keys go to postprocessing.json in the run folder (with each option's scores, the
cases it improved, worsened and lost, and each case's Dice before and after) and into best.pt under "postprocessing"; `stored_config`
applies them when a checkpoint is evaluated or exported, and keys given on the command line still win.
"""
import dataclasses
import logging
import os

import numpy as np

from cases.h5 import case_format, read_case
from config import POSTSELECT, Config, apply_dict, from_dict
from evaluation.inference import predict_case
from evaluation.metrics import score_case
from evaluation.postprocess import label_map_regions, threshold_regions, tumour_probability
from model import build_model
from runtime import distributed
from runtime.atomic import write_json
from runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint
from runtime.precision import autocast_dtype
from transforms.regions import labels_to_regions, task_regions

log = logging.getLogger(__name__)

KEYS = ("eval.largest_component", "eval.min_component_voxels", "eval.unsure_component_voxels",
        "eval.unsure_component_peak", "eval.minor_component_share", "eval.postprocess_et_min")
DETECTED = 0.5   # sensitivity of the first region at which a case counts as a found tumour
EPS = 1e-9


def candidate_steps(task, grid=POSTSELECT):
    """[(step name, [options: {key: value}])] in the order they are tried."""
    components = [{"eval.unsure_component_voxels": voxels, "eval.unsure_component_peak": peak}
                  for voxels in grid.unsure_voxels for peak in grid.unsure_peaks]
    steps = [("tumour components", components),
             ("minor components", [{"eval.minor_component_share": share} for share in grid.minor_shares])]
    if task == "brats":
        steps.append(("small ET to necrosis", [{"eval.postprocess_et_min": s} for s in grid.et_sizes]))
    return steps


def settings_of(eval_cfg):
    """The postprocessing keys of an EvalConfig as {'eval.key': value}."""
    return {key: getattr(eval_cfg, key.split(".")[1]) for key in KEYS}


@dataclasses.dataclass
class Prediction:
    """One validation case, predicted once: thresholded regions before postprocessing, the tumour
    probability the unsure-component rule reads, and the truth."""
    case_id: str
    pred: np.ndarray      # (R, *spatial) bool
    truth: np.ndarray     # (R, *spatial) bool
    spacing: tuple
    probs: np.ndarray | None = None   # (1, *spatial) float32: postprocess.tumour_probability


def predict_cases(model, paths, cfg, device):
    """Predictions of the labelled cases `paths` at their native grids (no postprocessing)."""
    amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    fmt, regions, out = case_format(cfg.data), task_regions(cfg.data.task), []
    for path in paths:
        case = read_case(path, fmt)
        probs = predict_case(model, case.image, cfg, device, amp_dtype, case.spacing)
        truth = labels_to_regions(case.mask, regions).numpy() > 0.5
        out.append(Prediction(case.case_id, threshold_regions(probs, cfg.eval), truth, case.spacing,
                              tumour_probability(probs)[None]))
    return out


@dataclasses.dataclass
class Trial:
    """One setting scored on every case: means (for postprocessing.json), per-case scores and the
    postprocessed regions (so a later option that changes nothing on a case reuses its scores)."""
    means: dict           # {"dice": {region: mean}, "mean_dice", and with HD95 "hd95", "mean_hd95"}
    cases: list           # per case {region: {metric: value}}
    regions: list         # per case (R, *spatial) bool


def score_settings(predictions, cfg, settings, with_hd95, reference=None):
    """Score every case under one candidate `settings`; a case whose postprocessed regions equal
    those of the `reference` Trial keeps its scores there. Scored on the stored grid: the brain crop
    changes neither Dice nor HD95."""
    eval_cfg = dataclasses.replace(cfg.eval, **{key.split(".")[1]: value for key, value in settings.items()})
    names, cases, kept = list(task_regions(cfg.data.task)), [], []
    for i, p in enumerate(predictions):
        pred = label_map_regions(p.pred, cfg.data.task, eval_cfg, p.probs)
        if reference is not None and np.array_equal(pred, reference.regions[i]):
            cases.append(reference.cases[i])
        else:
            cases.append(score_case(pred, p.truth, names, p.spacing, with_hd95=with_hd95))
        kept.append(pred)
    return Trial(mean_scores(cases, names, with_hd95), cases, kept)


def mean_scores(cases, names, with_hd95):
    """Mean Dice (and HD95) per region over the cases, and their mean over regions."""
    result = {"dice": {r: float(np.mean([s[r]["dice"] for s in cases])) for r in names}}
    if with_hd95:
        result["hd95"] = {r: float(np.mean([s[r]["hd95"] for s in cases])) for r in names}
    for metric in list(result):
        result[f"mean_{metric}"] = float(np.mean(list(result[metric].values())))
    return result


def improves(new, old):
    """nnU-Net's rule on the means: no region's Dice falls, and the mean Dice rises (or stays, with a lower HD95)."""
    if any(new["dice"][r] < old["dice"][r] - EPS for r in old["dice"]):
        return False
    if new["mean_dice"] > old["mean_dice"] + EPS:
        return True
    return "mean_hd95" in new and new["mean_dice"] >= old["mean_dice"] - EPS and new["mean_hd95"] < old["mean_hd95"] - EPS


def case_change(new, old):
    """+1 when a case got better, -1 worse, 0 unchanged: its mean Dice over regions, then (equal
    Dice, HD95 scored) its mean HD95."""
    dice = [np.mean([s[r]["dice"] for r in s]) for s in (new, old)]
    if abs(dice[0] - dice[1]) > EPS:
        return 1 if dice[0] > dice[1] else -1
    if all("hd95" in s[r] for s in (new, old) for r in s):
        hd = [np.mean([s[r]["hd95"] for r in s]) for s in (new, old)]
        if abs(hd[0] - hd[1]) > EPS:
            return 1 if hd[0] < hd[1] else -1
    return 0


def lost_detections(new_cases, raw_cases, case_ids, region):
    """Case ids where `region` was found (raw sensitivity >= DETECTED) and its Dice fell under half
    of the raw Dice."""
    return [cid for cid, new, raw in zip(case_ids, new_cases, raw_cases)
            if raw[region]["sensitivity"] >= DETECTED and new[region]["dice"] < 0.5 * raw[region]["dice"] - EPS]


def judge(trial, best, raw, case_ids):
    """The verdict on one option against the current best Trial and the raw one (before the search):
    {"cases_improved", "cases_worsened", "detections_lost": [case ids], "refused": reason or None}."""
    changes = [case_change(new, old) for new, old in zip(trial.cases, best.cases)]
    improved, worsened = changes.count(1), changes.count(-1)
    lost = lost_detections(trial.cases, raw.cases, case_ids, next(iter(trial.means["dice"])))
    refused = None
    if not improves(trial.means, best.means):
        refused = "the mean does not improve, or a region's mean Dice falls"
    elif improved <= worsened:
        refused = f"{worsened} cases worsen against {improved} that improve"
    elif lost:
        refused = f"it loses a found tumour on {len(lost)} case(s)"
    return {"cases_improved": improved, "cases_worsened": worsened, "detections_lost": lost, "refused": refused}


def better(new, old):
    """Between two options that both improve: higher mean Dice, then lower mean HD95."""
    if abs(new["mean_dice"] - old["mean_dice"]) > EPS:
        return new["mean_dice"] > old["mean_dice"]
    return new.get("mean_hd95", 0.0) < old.get("mean_hd95", 0.0) - EPS


def choose_postprocessing(predictions, cfg, fixed=(), steps=None, with_hd95=None):
    """The greedy search over `steps` (default: candidate_steps) on cases already predicted.

    Starts from cfg.eval's settings; options touching a key in `fixed` are skipped. Returns a report:
    {"chosen": {key: value}, "baseline": scores, "result": scores, "trials": [...], "cases": n}."""
    with_hd95 = cfg.data.task == "brats" if with_hd95 is None else with_hd95
    current, ids = settings_of(cfg.eval), [p.case_id for p in predictions]
    raw = best = score_settings(predictions, cfg, current, with_hd95)
    trials = []
    for name, options in steps or candidate_steps(cfg.data.task):
        winner = None
        for option in options:
            if set(option) & set(fixed):
                continue
            trial = score_settings(predictions, cfg, {**current, **option}, with_hd95, reference=best)
            verdict = judge(trial, best, raw, ids)
            trials.append({"step": name, "settings": option, **trial.means, **verdict})
            if verdict["refused"] is None and (winner is None or better(trial.means, winner[1].means)):
                winner = (option, trial)
        if winner:
            current, best = {**current, **winner[0]}, winner[1]
            log.info("postprocessing: %s: keep %s (mean Dice %.4f)", name, winner[0], best.means["mean_dice"])
        else:
            log.info("postprocessing: %s: no option helps most validation cases", name)
    per_case = [{"case": cid, "raw": {r: round(float(s["dice"]), 5) for r, s in before.items()},
                 "chosen": {r: round(float(s["dice"]), 5) for r, s in after.items()}}
                for cid, before, after in zip(ids, raw.cases, best.cases)]
    return {"chosen": current, "cases": len(predictions), "fixed": sorted(fixed), "baseline": raw.means,
            "result": best.means, "trials": trials, "per_case": per_case}


def user_set_postprocessing_keys(cfg):
    """Postprocessing keys the user set away from their defaults: those are not searched."""
    defaults = settings_of(Config().eval)
    return [key for key, value in settings_of(cfg.eval).items() if value != defaults[key]]


def choose_for_checkpoint(best_path, val_paths, run_dir, device):
    """After training: choose the postprocessing for best.pt on the validation cases, write
    postprocessing.json and store the choice in best.pt. Rank 0 works, the other ranks wait.
    Returns the chosen settings (None when nothing was chosen)."""
    report = None
    if distributed.is_main():
        report = _choose_and_store(best_path, val_paths, run_dir, device)
    distributed.barrier()  # best.pt holds the choice before any rank evaluates it
    return report["chosen"] if report else None


def _choose_and_store(best_path, val_paths, run_dir, device):
    cfg = from_dict(load_checkpoint(best_path)["config"])
    if not cfg.eval.choose_postprocessing or not val_paths:
        log.info("postprocessing: not chosen (%s)", "data.val_fraction 0: nothing to choose it on"
                 if cfg.eval.choose_postprocessing else "eval.choose_postprocessing is false")
        return None
    return choose_on_pool([(best_path, val_paths)], run_dir, device)


def choose_for_folds(fold_runs, run_dir, device):
    """Cross-validation: choose one postprocessing on the pool of every fold's validation cases, each
    predicted by the fold that did not train on it (as nnU-Net chooses over its folds), and store it in
    every fold's best.pt. `fold_runs`: [(best.pt path, validation case paths)]. Rank 0 works, the
    other ranks wait. Returns the report (None on the other ranks)."""
    report = choose_on_pool(fold_runs, run_dir, device) if distributed.is_main() else None
    distributed.barrier()  # every best.pt holds the choice before any rank evaluates the ensemble
    return report


def choose_on_pool(runs, run_dir, device):
    """Predict each run's validation cases with its best.pt, choose on all of them together, write
    postprocessing.json to run_dir and the choice into every best.pt; returns the report."""
    predictions, cfg = [], None
    for best_path, val_paths in runs:
        state = load_checkpoint(best_path)
        cfg = from_dict(state["config"])
        model = build_model(cfg.model).to(device)
        load_weights(model, state, best_path)
        predictions += predict_cases(model, val_paths, cfg, device)
    report = choose_postprocessing(predictions, cfg, fixed=user_set_postprocessing_keys(cfg))
    write_json(os.path.join(run_dir, "postprocessing.json"), report)
    for best_path, _ in runs:
        state = load_checkpoint(best_path)
        state["postprocessing"] = report["chosen"]
        save_checkpoint(best_path, state)
    log.info("postprocessing chosen on %d validation cases: %s (written to postprocessing.json and %d best.pt)",
             report["cases"], report["chosen"], len(runs))
    return report


def stored_config(state):
    """The config a checkpoint is evaluated and exported with: its training config with the
    postprocessing chosen after training (absent in older checkpoints) applied; command-line keys
    go on top of it (config.build_config(pairs, base=...)), so an explicit key always wins."""
    return apply_dict(from_dict(state["config"]), state.get("postprocessing") or {})
