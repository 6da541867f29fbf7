"""Postprocessing chosen on the validation cases after training, as nnU-Net chooses it.

Each validation case is predicted once with best.pt and its thresholded regions kept in memory;
every candidate postprocessing (postprocess.py's label-space operations, set by eval.* keys) is
then tried on them and scored per case: Dice per region from voxel counts and, for BraTS, HD95.
The candidates are tried one step at a time, greedily, each step on top of what earlier steps kept:
  1. tumour components: keep only the largest (eval.largest_component), or remove those below a
     size (eval.min_component_voxels), the cure for a stray false positive far from the tumour;
  2. BraTS only: a small predicted ET becomes necrosis (eval.postprocess_et_min).
A step keeps its best option only when no region's mean Dice falls and either the mean Dice over
regions rises or it stays and the mean HD95 falls (nnU-Net's rule: better on the mean, no worse
on any region it touches). Keys the user set away from their defaults are not searched.
The chosen keys go to postprocessing.json in the run folder and into best.pt under
"postprocessing"; `stored_config` applies them when a checkpoint is evaluated or exported, and
keys given on the command line still win.
"""
import dataclasses
import logging
import os

import numpy as np

from cases.h5 import case_format, read_case
from config import Config, apply_dict, from_dict
from evaluation.inference import predict_case
from evaluation.metrics import score_case
from evaluation.postprocess import label_map_regions
from model import build_model
from runtime import distributed
from runtime.atomic import write_json
from runtime.checkpoint import load_checkpoint, load_weights, save_checkpoint
from runtime.precision import autocast_dtype
from transforms.regions import labels_to_regions, task_regions

log = logging.getLogger(__name__)

KEYS = ("eval.largest_component", "eval.min_component_voxels", "eval.postprocess_et_min")
COMPONENT_SIZES = (10, 100, 1000, 10000)   # voxels; a 1 mm BraTS tumour has 10^4 - 10^5
ET_SIZES = (50, 200, 500, 1000)             # voxels; BraTS winners relabel ET below ~500 at 1 mm
EPS = 1e-9


def candidate_steps(task, component_sizes=COMPONENT_SIZES, et_sizes=ET_SIZES):
    """[(step name, [options: {key: value}])] in the order they are tried."""
    components = [{"eval.largest_component": True, "eval.min_component_voxels": 0}]
    components += [{"eval.largest_component": False, "eval.min_component_voxels": s} for s in component_sizes]
    steps = [("tumour components", components)]
    if task == "brats":
        steps.append(("small ET to necrosis", [{"eval.postprocess_et_min": s} for s in et_sizes]))
    return steps


def settings_of(eval_cfg):
    """The postprocessing keys of an EvalConfig as {'eval.key': value}."""
    return {key: getattr(eval_cfg, key.split(".")[1]) for key in KEYS}


@dataclasses.dataclass
class Prediction:
    """One validation case, predicted once: thresholded regions before postprocessing, and truth."""
    case_id: str
    pred: np.ndarray      # (R, *spatial) bool
    truth: np.ndarray     # (R, *spatial) bool
    spacing: tuple


def predict_cases(model, paths, cfg, device):
    """Predictions of the labelled cases `paths` at their native grids (no postprocessing)."""
    amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    fmt, regions, out = case_format(cfg.data), task_regions(cfg.data.task), []
    for path in paths:
        case = read_case(path, fmt)
        probs = predict_case(model, case.image, cfg, device, amp_dtype, case.spacing)
        truth = labels_to_regions(case.mask, regions).numpy() > 0.5
        out.append(Prediction(case.case_id, (probs > cfg.eval.threshold).numpy(), truth, case.spacing))
    return out


def score_settings(predictions, cfg, settings, with_hd95):
    """Mean Dice (and HD95) per region over the cases under one candidate `settings`, and their
    mean over regions. Scored on the stored grid: the brain crop changes neither Dice nor HD95."""
    eval_cfg = dataclasses.replace(cfg.eval, **{key.split(".")[1]: value for key, value in settings.items()})
    regions, per_case = list(task_regions(cfg.data.task)), []
    for p in predictions:
        pred = label_map_regions(p.pred, cfg.data.task, eval_cfg)
        per_case.append(score_case(pred, p.truth, regions, p.spacing, with_hd95=with_hd95))
    result = {"dice": {r: float(np.mean([s[r]["dice"] for s in per_case])) for r in regions}}
    if with_hd95:
        result["hd95"] = {r: float(np.mean([s[r]["hd95"] for s in per_case])) for r in regions}
    for metric in list(result):
        result[f"mean_{metric}"] = float(np.mean(list(result[metric].values())))
    return result


def improves(new, old):
    """nnU-Net's rule: no region's Dice falls, and the mean Dice rises (or stays, with a lower HD95)."""
    if any(new["dice"][r] < old["dice"][r] - EPS for r in old["dice"]):
        return False
    if new["mean_dice"] > old["mean_dice"] + EPS:
        return True
    return "mean_hd95" in new and new["mean_dice"] >= old["mean_dice"] - EPS and new["mean_hd95"] < old["mean_hd95"] - EPS


def better(new, old):
    """Between two options that both improve: higher mean Dice, then lower mean HD95."""
    if abs(new["mean_dice"] - old["mean_dice"]) > EPS:
        return new["mean_dice"] > old["mean_dice"]
    return new.get("mean_hd95", 0.0) < old.get("mean_hd95", 0.0) - EPS


def choose(predictions, cfg, fixed=(), steps=None, with_hd95=None):
    """The greedy search over `steps` (default: candidate_steps) on cases already predicted.

    Starts from cfg.eval's settings; options touching a key in `fixed` are skipped. Returns a report:
    {"chosen": {key: value}, "baseline": scores, "result": scores, "trials": [...], "cases": n}."""
    with_hd95 = cfg.data.task == "brats" if with_hd95 is None else with_hd95
    current = settings_of(cfg.eval)
    baseline = best = score_settings(predictions, cfg, current, with_hd95)
    trials = []
    for name, options in steps or candidate_steps(cfg.data.task):
        winner = None
        for option in options:
            if set(option) & set(fixed):
                continue
            scores = score_settings(predictions, cfg, {**current, **option}, with_hd95)
            trials.append({"step": name, "settings": option, **scores})
            if improves(scores, best) and (winner is None or better(scores, winner[1])):
                winner = (option, scores)
        if winner:
            current, best = {**current, **winner[0]}, winner[1]
            log.info("postprocessing: %s: keep %s (mean Dice %.4f)", name, winner[0], best["mean_dice"])
        else:
            log.info("postprocessing: %s: no option improves the validation cases", name)
    return {"chosen": current, "cases": len(predictions), "fixed": sorted(fixed), "baseline": baseline,
            "result": best, "trials": trials}


def explicit_keys(cfg):
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
    state = load_checkpoint(best_path)
    cfg = from_dict(state["config"])
    if not cfg.eval.choose_postprocessing or not val_paths:
        log.info("postprocessing: not chosen (%s)", "data.val_fraction 0: nothing to choose it on"
                 if cfg.eval.choose_postprocessing else "eval.choose_postprocessing is false")
        return None
    model = build_model(cfg.model).to(device)
    load_weights(model, state, best_path)
    report = choose(predict_cases(model, val_paths, cfg, device), cfg, fixed=explicit_keys(cfg))
    write_json(os.path.join(run_dir, "postprocessing.json"), report)
    state["postprocessing"] = report["chosen"]
    save_checkpoint(best_path, state)
    log.info("postprocessing chosen on %d validation cases: %s (written to postprocessing.json and best.pt)",
             report["cases"], report["chosen"])
    return report


def stored_config(state):
    """The config a checkpoint is evaluated and exported with: its training config with the
    postprocessing chosen after training (absent in older checkpoints) applied; command-line keys
    go on top of it (config.build_config(pairs, base=...)), so an explicit key always wins."""
    return apply_dict(from_dict(state["config"]), state.get("postprocessing") or {})
