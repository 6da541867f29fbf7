"""Evaluate a checkpoint: predict every case of a split at native resolution and score it.

    python evaluate.py --checkpoint RUN/best.pt [--data.dir DIR] [--split test|val|all] [--out DIR]

The model is rebuilt from the config stored in the checkpoint; data.* and eval.* keys can be
overridden on the command line. Writes per_case.csv and summary.json (means over cases) to --out
(default: the checkpoint's folder) and prints a table.
"""
import argparse
import csv
import io
import json
import logging
import os
import sys

from tqdm import tqdm

from atomic import write_json, write_text
from cases import DataError, case_id_of, read_case
from checkpoint import CheckpointError, load_checkpoint, load_weights
from config import build_config, from_dict, split_args
from dataset import case_format, list_cases
from inference import predict_case
from metrics import score_case, summarise
from model import build_model
from train import autocast_dtype, resolve_device
from transforms import REGIONS, labels_to_regions

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


def evaluate_cases(model, paths, cfg, device):
    """Score each case; returns a list of (case_id, {region: {metric: value}})."""
    fmt, amp_dtype, results = case_format(cfg.data), autocast_dtype(device, cfg.train.amp), []
    for path in tqdm(paths, desc="evaluate", leave=False, dynamic_ncols=True):
        case = read_case(path, fmt)
        probs = predict_case(model, case.image, cfg, device, amp_dtype)
        pred = (probs > cfg.eval.threshold).numpy()
        truth = labels_to_regions(case.mask).numpy() > 0.5
        results.append((case.case_id, score_case(pred, truth, list(REGIONS), case.spacing)))
    return results


def write_reports(out_dir, results, split, extra):
    rows = [{"case": cid, **{f"{r}_{m}": round(v, 5) for r, s in scores.items() for m, v in s.items()}}
            for cid, scores in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(os.path.join(out_dir, "per_case.csv"), buffer.getvalue())
    summary = {"split": split, "cases": len(results), **extra,
               "regions": summarise([scores for _, scores in results], list(REGIONS))}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def format_table(summary):
    metrics = ("dice", "iou", "sensitivity", "specificity", "hd95")
    lines = [f"{summary['split']} split, {summary['cases']} cases (means over cases)",
             f"{'region':<8}" + "".join(f"{m:>13}" for m in metrics)]
    for region, values in summary["regions"].items():
        lines.append(f"{region:<8}" + "".join(f"{values.get(m, float('nan')):>13.4f}" for m in metrics))
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint_path, split="test", out_dir=None, overrides=None, device=None):
    """Rebuild the model from a checkpoint, score a split, write reports; returns the summary."""
    state = load_checkpoint(checkpoint_path)
    cfg = from_dict(state["config"])
    for key in overrides or {}:
        if not key.startswith(("data.", "eval.", "train.device")):
            raise KeyError(f"--{key}: only data.*, eval.* and train.device can change at evaluation "
                           f"(the model comes from the checkpoint)")
    cfg = build_config(overrides or {}, base=cfg)
    device = device or resolve_device(cfg.train.device)
    model = build_model(cfg.model).to(device)
    load_weights(model, state, checkpoint_path)
    run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    paths = select_cases(cfg.data.dir, split, os.path.join(run_dir, "split.json"))
    results = evaluate_cases(model, paths, cfg, device)
    out_dir = out_dir or run_dir
    summary = write_reports(out_dir, results, split, {"checkpoint": os.path.abspath(checkpoint_path),
                                                      "data_dir": os.path.abspath(cfg.data.dir)})
    log.info("wrote %s and %s", os.path.join(out_dir, "per_case.csv"), os.path.join(out_dir, "summary.json"))
    return summary


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="path to best.pt or last.pt")
    parser.add_argument("--split", default="test", choices=["test", "val", "all"])
    parser.add_argument("--out", default=None, help="folder for per_case.csv and summary.json")
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = evaluate_checkpoint(args.checkpoint, args.split, args.out, pairs)
    except (DataError, CheckpointError, KeyError, ValueError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    print(format_table(summary))


if __name__ == "__main__":
    main()
