"""Evaluate a checkpoint, a cross-validation run or an ensemble: predict every case of a split at
its native grid, score it, and write per_case.csv, summary.json, overlays and, when asked, the
scored label maps. `python evaluate.py --help` lists the options; docs/evaluation.md explains them.
"""
import argparse
import json
import logging
import os
import sys

from tqdm import tqdm

from cases.h5 import DataError, case_format, case_id_of, read_case
from cases.patients import patient_id
from cases.splits import list_cases
from evaluation.checkpoints import checkpoint_files, load_members
from evaluation.ensemble import evaluate_case, evaluate_ensemble_case
from evaluation.export import export_case
from evaluation.postselect import settings_of
from evaluation.reports import format_confidence, format_table, write_confidence, write_reports
from overrides import split_args
from runtime import distributed
from runtime.checkpoint import CheckpointError
from runtime.precision import autocast_dtype
from transforms.regions import task_regions

log = logging.getLogger(__name__)


def select_cases(data_dir, split, split_file):
    """The case files of a split; 'all' takes every file in data_dir."""
    paths = list_cases(data_dir)
    if split == "all":
        return paths
    if not os.path.isfile(split_file):
        raise DataError(f"{split_file}: no split file beside the checkpoint; use --split all")
    with open(split_file) as f:
        saved = json.load(f)
    wanted = set(saved[split])
    if not wanted:
        why = saved.get("held_out", {}).get(split)
        other = "--split val" if split == "test" else "--split test"
        raise DataError(f"{split_file}: no {split} cases in this run's split" + (f" ({why})" if why else "")
                        + f"; use {other}, or score other cases with --data.dir DIR --split all")
    chosen = [p for p in paths if case_id_of(p) in wanted]
    missing = wanted - {case_id_of(p) for p in chosen}
    if missing:
        raise DataError(f"{data_dir}: {len(missing)} {split}-split cases of {split_file} are not there "
                        f"(e.g. {sorted(missing)[:3]}); point --data.dir at the training data or use --split all")
    return chosen


def evaluate_cases(model, paths, cfg, device, *, out_dir=None, save_predictions=False, overlays=False,
                   labelled=True, members=None):
    """Predict each case, postprocess, score it (when `labelled`) and export what was asked for;
    returns a list of (case_id, {region: {metric: value}}, confidence) (empty scores when
    unlabelled; confidence.case_confidence needs no labels). With `members` (checkpoints.Member
    list) the mean of their probabilities is scored instead of `model`'s, and their agreement counts
    in the confidence."""
    fmt, amp_dtype = case_format(cfg.data), autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    brats, results = cfg.data.task == "brats", []
    for path in tqdm(paths, desc="evaluate" if labelled else "predict", leave=False, dynamic_ncols=True,
                     disable=not distributed.is_main()):
        case = read_case(path, fmt, with_mask=labelled)
        result = (evaluate_ensemble_case(members, case, device, with_hd95=brats, with_lesions=brats) if members
                  else evaluate_case(model, case, cfg, device, amp_dtype, with_hd95=brats, with_lesions=brats,
                                     with_confidence=True))
        if save_predictions or overlays:
            probs = result.probs.cpu().numpy() if cfg.eval.save_probabilities else None
            export_case(out_dir, case, result.pred, probs=probs, default_enhancing=cfg.eval.enhancing_label,
                        predictions=save_predictions, overlay=overlays, regions=task_regions(cfg.data.task))
        results.append((case.case_id, result.scores, result.confidence))
    return results


def split_file(checkpoint_file):
    """The split.json beside a checkpoint: it names the cases of each split of its run (for a
    fold ensemble, read beside the first fold: every fold shares its test split)."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_file)), "split.json")


def check_held_out(files, paths, split):
    """Refuse an ensemble whose members saw the cases it is about to score: for each member the
    split.json beside it must exist and name none of their patients among its training cases
    (nor, when scoring the test split, its validation cases, which chose its best.pt)."""
    scored = {patient_id(case_id): case_id for case_id in map(case_id_of, paths)}
    seen_keys = ("train", "val") if split == "test" else ("train",)
    for path in files:
        member_split = split_file(path)
        if not os.path.isfile(member_split):
            raise DataError(f"{path}: no split.json beside it, so the cases it trained on are unknown; "
                            f"an ensemble is scored only on cases every member held out")
        with open(member_split) as f:
            recorded = json.load(f)
        seen = {patient_id(c) for key in seen_keys for c in recorded.get(key, [])} & scored.keys()
        if seen:
            examples = sorted(scored[p] for p in seen)[:3]
            raise DataError(f"{path}: its run trained or validated on {len(seen)} of the {split}-split patients "
                            f"(e.g. {examples}); the folds of a cross-validation run validate on different "
                            f"cases, so score such an ensemble on the test split, and independent runs only "
                            f"on a split every member held out")


def evaluate_checkpoint(checkpoint_path, split=None, out_dir=None, overrides=None, *, device=None,
                        save_predictions=False, overlays=False, predict=False):
    """Rebuild the model from a checkpoint, score a split (None: eval.split), write reports; returns the summary.

    checkpoint_path may be a run folder: its best.pt, or for a cross-validation run (data.fold all)
    the ensemble of its fold_<i>/best.pt (mean probabilities, see evaluation/ensemble.py); or a list of
    checkpoints or run folders: the ensemble of all, scored on the first one's split (check_held_out).
    With `predict` the cases need no labels: they are predicted and exported, not scored, and the
    summary only lists them. Under torchrun every rank calls this and scores its share of the cases;
    rank 0 writes the reports and returns the summary, the other ranks return None."""
    specs = [checkpoint_path] if isinstance(checkpoint_path, (str, os.PathLike)) else list(checkpoint_path)
    if len(specs) > 1 and not out_dir:
        raise DataError(f"{len(specs)} checkpoints: give --out, so the ensemble's reports do not overwrite "
                        f"the first run's own")
    files = [f for spec in specs for f in checkpoint_files(spec)]
    members = load_members(files, device, overrides)
    split = split or members[0].cfg.eval.split
    paths = select_cases(members[0].cfg.data.dir, split, split_file(files[0]))
    if len(files) > 1 and split != "all":
        check_held_out(files, paths, split)
    out_dir = out_dir or (specs[0] if os.path.isdir(specs[0]) else os.path.dirname(os.path.abspath(specs[0])))
    results = evaluate_shards(members, paths, out_dir=out_dir, save_predictions=save_predictions or predict,
                              overlays=overlays, labelled=not predict)
    if not distributed.is_main():
        return None
    if predict:
        return predicted_summary(results, split, out_dir)
    return scored_summary(results, split, out_dir, specs, members)


def evaluate_shards(members, paths, **export):
    """evaluate_cases under torchrun: rank r scores cases r, r + world, ...; returns every case's
    result on every rank, in the order of `paths`. `export`: evaluate_cases' keyword arguments."""
    first, rank, world = members[0], distributed.rank(), distributed.world_size()
    mine = evaluate_cases(first.model, paths[rank::world], first.cfg, first.device,
                          members=members if len(members) > 1 else None, **export)
    shards = distributed.gather_objects(mine)
    # case i was rank i % world's (i // world)-th: interleave back into the single-process order
    return [shards[i % world][i // world] for i in range(len(paths))]


def predicted_summary(results, split, out_dir):
    """What --predict returns: the cases predicted, where their label maps are, and the least
    confident of them (every case's confidence goes to OUT/confidence.csv)."""
    folder = os.path.join(out_dir, "predictions")
    least = write_confidence(out_dir, {cid: confidence for cid, _, confidence in results})
    log.info("wrote predictions of %d cases to %s, their confidence to %s", len(results), folder,
             os.path.join(out_dir, "confidence.csv"))
    return {"split": split, "cases": len(results), "predicted": [cid for cid, _, _ in results],
            "predictions_dir": folder, "least_confident": least}


def scored_summary(results, split, out_dir, specs, members):
    """Write per_case.csv and summary.json (which checkpoints, data, task and postprocessing made
    the figures); returns the summary."""
    cfg = members[0].cfg
    about = {"checkpoint": os.path.abspath(specs[0]) if len(specs) == 1 else [os.path.abspath(c) for c in specs],
             "data_dir": os.path.abspath(cfg.data.dir),
             "task": cfg.data.task}
    if len(members) > 1:
        about["ensemble"] = [os.path.abspath(m.path) for m in members]
    about["postprocessing"] = settings_of(cfg.eval)
    summary = write_reports(out_dir, results, split, about, list(task_regions(cfg.data.task)))
    log.info("wrote %s and %s", os.path.join(out_dir, "per_case.csv"), os.path.join(out_dir, "summary.json"))
    return summary


EPILOG = """\
The model is rebuilt from the config stored in the checkpoint. data.*, eval.* and train.device keys
may follow (e.g. --data.dir NEW --eval.threshold 0.4); the postprocessing chosen on the validation
cases after training applies unless an eval.* key given here overrides it. --split test|val reads
the split.json beside the checkpoint; all takes every case in data.dir.

Writes to --out (default: the checkpoint's folder) per_case.csv and summary.json: mean, std and
median over cases of Dice, IoU, sensitivity, specificity and HD95 per region (brats: also the BraTS
2023 lesion-wise figures); binary tasks (e.g. Kaggle LGG) are scored per patient, from voxel counts
summed over the patient's slices, with per-slice figures under "per_slice" and no HD95. A table is
printed and an overlay PNG drawn per case in OUT/overlays. Each case also gets a confidence computed
without its labels (per_case.csv's confidence column); summary.json names the least confident cases
and how well confidence ranks the true Dice (confidence_rank_correlation). With --predict, the
confidence goes to OUT/confidence.csv.

--save-predictions writes the label map that was scored to OUT/predictions: <case>.nii.gz on the
source grid and affine for cases converted from NIfTI, else <case>.h5. Enhancing tumour gets the
label of the case's own BraTS naming, as its conversion recorded it (3 for 2023+, 4 for 2018-21;
a case named like BraTS-GLI-00000-000 is 2023+), else eval.enhancing_label. Cases converted from
the Kaggle LGG TIFFs also get <patient>/<patient>_<n>_pred.tif (0/255).

A cross-validation run folder (data.fold all) is the ensemble of its folds' best.pt (the mean of
their probabilities), scored on the test split no fold saw. Several --checkpoint are an ensemble
too, scored on the first run's split; it needs --out, and is refused when any member trained or
validated on a patient of that split (each member's split.json is read).

Under torchrun (torchrun --nproc_per_node=N evaluate.py ...) rank i predicts cases i, i+N, ...
(writing their overlays and label maps); rank 0 writes the reports, whose figures equal a
one-process evaluation. More in docs/evaluation.md.
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint, a cross-validation run or an ensemble on a split.",
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint", action="append", required=True,
                        help="best.pt or last.pt, or a run folder (its best.pt; with fold_<i> folders their ensemble); "
                             "given several times, the ensemble of all (with --out)")
    parser.add_argument("--split", default=None, choices=["test", "val", "all"],
                        help="cases to evaluate (default: the config's eval.split, test unless changed)")
    parser.add_argument("--out", default=None, help="folder for per_case.csv, summary.json, overlays/, predictions/")
    parser.add_argument("--save-predictions", action="store_true",
                        help="write the scored label map per case to OUT/predictions (NIfTI when the case came "
                             "from NIfTI; Kaggle LGG cases also as <patient>/<patient>_<n>_pred.tif)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="with the label maps, write region probabilities as .npz")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                        help="draw a FLAIR overlay PNG per case in OUT/overlays (default: on)")
    parser.add_argument("--predict", action="store_true",
                        help="cases without labels (use with --split all): predict and export only, no scores")
    return parser.parse_args(argv)


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(rest)
    if args.save_probabilities:
        pairs["eval.save_probabilities"] = "true"
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING, format="%(message)s")
    try:
        distributed.init_from_env(pairs.get("train.device", "auto"))
        summary = evaluate_checkpoint(args.checkpoint, args.split, args.out, pairs,
                                      save_predictions=args.save_predictions, overlays=args.overlays,
                                      predict=args.predict)
    except (DataError, CheckpointError, KeyError, ValueError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    finally:
        distributed.cleanup()
    if summary is None:  # not rank 0
        return
    if args.predict:
        print("\n".join([f"predicted {summary['cases']} cases; label maps in {summary['predictions_dir']}",
                         *format_confidence(summary)]))
    else:
        print(format_table(summary))


if __name__ == "__main__":
    main()
