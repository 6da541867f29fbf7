"""Evaluate a checkpoint: predict every case of a split at native resolution and score it.

    python evaluate.py --checkpoint RUN/best.pt|RUN [--checkpoint RUN2 ...] [--data.dir DIR] [--split test|val|all] [--out DIR]
                       [--save-predictions] [--save-probabilities] [--no-overlays] [--predict]

The model is rebuilt from the config stored in the checkpoint; data.* and eval.* keys can be
overridden on the command line, and the postprocessing chosen on the validation cases after
training (stored in the checkpoint, see postselect.py) applies unless an eval.* key given here
overrides it. --split defaults to the config's eval.split (test unless changed). Writes
per_case.csv and summary.json (means, std and median over cases of Dice, IoU, sensitivity,
specificity and HD95 per region; brats: also the BraTS 2023 lesion-wise figures, see
docs/evaluation.md) to --out (default: the checkpoint's folder), prints a table, and draws an
overlay PNG per case in --out/overlays. The scores are those of the label map that
--save-predictions writes.
Binary tasks (data.task binary, e.g. Kaggle LGG) are scored per patient: each patient's slices
stacked into one volume, voxel counts summed, Dice and IoU from those counts (the headline; no
HD95, whose empty-case value is BraTS's); beside it, under "per_slice", Dice and IoU averaged over
the tumour-containing slices and the number of tumour-free slices with a false-positive prediction.
--save-predictions writes a label map per case to --out/predictions (NIfTI on the source grid
and affine for cases converted from NIfTI, else .h5; cases converted from the Kaggle LGG TIFFs also
get the dataset's own layout, <patient>/<patient>_<n>_pred.tif, 0/255; see export.py). --predict is for cases
without labels: it only predicts and exports (use it with --split all).
A cross-validation run folder (data.fold all) as --checkpoint evaluates the ensemble of its
folds' best.pt on the test split no fold saw: the mean of their probabilities per case. Several
--checkpoint (e.g. runs with different train.seed) are an ensemble too, scored on the first
run's split; it is refused when any member trained or validated on a patient of that split
(each member's split.json is read), and it needs --out.
Under torchrun (`torchrun --nproc_per_node=N evaluate.py ...`) case i is predicted by rank i % N
(which also writes that case's overlay and prediction files); the per-case results are gathered
to rank 0, which writes per_case.csv and summary.json in the single-process case order, so the
figures equal a one-process evaluation of the same checkpoint.
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
from evaluation.reports import format_table, write_reports
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
        wanted = set(json.load(f)[split])
    chosen = [p for p in paths if case_id_of(p) in wanted]
    missing = wanted - {case_id_of(p) for p in chosen}
    if missing:
        raise DataError(f"{data_dir}: {len(missing)} {split}-split cases of {split_file} are not there "
                        f"(e.g. {sorted(missing)[:3]}); point --data.dir at the training data or use --split all")
    return chosen


def evaluate_cases(model, paths, cfg, device, out_dir=None, save_predictions=False, overlays=False,
                   labelled=True, members=None):
    """Predict each case, postprocess, score it (when `labelled`) and export what was asked for;
    returns a list of (case_id, {region: {metric: value}}) (empty scores when unlabelled).
    With `members` (ensemble.Member list) the mean of their probabilities is scored instead of `model`'s."""
    fmt, results = case_format(cfg.data), []
    amp_dtype = autocast_dtype(device, cfg.train.amp, cfg.train.precision)
    regions = task_regions(cfg.data.task)
    for path in tqdm(paths, desc="evaluate" if labelled else "predict", leave=False, dynamic_ncols=True,
                     disable=not distributed.is_main()):
        case = read_case(path, fmt, with_mask=labelled)
        brats = cfg.data.task == "brats"
        result = (evaluate_ensemble_case(members, case, device, brats, brats) if members else
                  evaluate_case(model, case, cfg, device, amp_dtype, with_hd95=brats, with_lesions=brats))
        if save_predictions or overlays:
            export_case(out_dir, case, result.pred, result.probs.numpy() if cfg.eval.save_probabilities else None,
                        cfg.eval.enhancing_label, predictions=save_predictions, overlay=overlays, regions=regions)
        results.append((case.case_id, result.scores))
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


def evaluate_checkpoint(checkpoint_path, split=None, out_dir=None, overrides=None, device=None,
                        save_predictions=False, overlays=False, predict=False):
    """Rebuild the model from a checkpoint, score a split (None: eval.split), write reports; returns the summary.

    checkpoint_path may be a run folder: its best.pt, or for a cross-validation run (data.fold all)
    the ensemble of its fold_<i>/best.pt (mean probabilities, see ensemble.py); or a list of
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
    cfg, device = members[0].cfg, members[0].device
    split = split or cfg.eval.split
    paths = select_cases(cfg.data.dir, split, split_file(files[0]))
    if len(files) > 1 and split != "all":
        check_held_out(files, paths, split)
    first = specs[0]
    out_dir = out_dir or (first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first)))
    rank, world = distributed.rank(), distributed.world_size()
    mine = evaluate_cases(members[0].model, paths[rank::world], cfg, device, out_dir, save_predictions or predict,
                          overlays, labelled=not predict, members=members if len(members) > 1 else None)
    shards = distributed.gather_objects(mine)
    # case i was rank i % world's (i // world)-th: interleave back into the single-process order
    results = [shards[i % world][i // world] for i in range(len(paths))]
    if not distributed.is_main():
        return None
    if predict:
        log.info("wrote predictions of %d cases to %s", len(results), os.path.join(out_dir, "predictions"))
        return {"split": split, "cases": len(results), "predicted": [cid for cid, _ in results],
                "predictions_dir": os.path.join(out_dir, "predictions")}
    about = {"checkpoint": os.path.abspath(specs[0]) if len(specs) == 1 else [os.path.abspath(c) for c in specs],
             "data_dir": os.path.abspath(cfg.data.dir),
             "task": cfg.data.task}
    if len(files) > 1:
        about["ensemble"] = [os.path.abspath(f) for f in files]
    about["postprocessing"] = settings_of(cfg.eval)
    summary = write_reports(out_dir, results, split, about, list(task_regions(cfg.data.task)))
    log.info("wrote %s and %s", os.path.join(out_dir, "per_case.csv"), os.path.join(out_dir, "summary.json"))
    return summary


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--checkpoint", action="append", required=True,
                        help="best.pt or last.pt, or a run folder (its best.pt; with fold_<i> folders their ensemble); "
                             "given several times, the ensemble of all (with --out)")
    parser.add_argument("--split", default=None, choices=["test", "val", "all"],
                        help="cases to evaluate (default: the config's eval.split, test unless changed)")
    parser.add_argument("--out", default=None, help="folder for per_case.csv, summary.json, overlays/, predictions/")
    parser.add_argument("--save-predictions", action="store_true",
                        help="write a label map per case to OUT/predictions (NIfTI when the case came from NIfTI; "
                             "Kaggle LGG cases also as <patient>/<patient>_<n>_pred.tif)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="with the label maps, write region probabilities as .npz")
    parser.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                        help="draw a FLAIR overlay PNG per case in OUT/overlays (default: on)")
    parser.add_argument("--predict", action="store_true",
                        help="cases without labels: predict and export only, no scores")
    args = parser.parse_args(rest)
    if args.save_probabilities:
        pairs["eval.save_probabilities"] = "true"
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING, format="%(message)s")
    try:
        distributed.init_from_env(pairs.get("train.device", "auto"))
        summary = evaluate_checkpoint(args.checkpoint, args.split, args.out, pairs, None, args.save_predictions,
                                      args.overlays, args.predict)
    except (DataError, CheckpointError, KeyError, ValueError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    finally:
        distributed.cleanup()
    if summary is None:  # not rank 0
        return
    if args.predict:
        print(f"predicted {summary['cases']} cases; label maps in {summary['predictions_dir']}")
    else:
        print(format_table(summary))


if __name__ == "__main__":
    main()
