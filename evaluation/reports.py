"""What a run and an evaluation write for people to read: CSV tables (metrics.csv, per_case.csv,
confidence.csv), the training curves (curves.png), summary.json and the printed summary table.
Files are written atomically.
"""
import csv
import io
import os

import numpy as np

from evaluation.confidence import least_confident, rank_correlation
from evaluation.lesions import LESION_COUNTS, LESION_KEYS, scoring_parameters
from evaluation.metrics import METRICS, pool_slice_scores, summarise
from runtime.atomic import write_json, write_text

PER_PATIENT = ("per patient: each patient's slices stacked into one volume, voxel counts summed, Dice and "
               "IoU from those counts; mean over patients")
PER_SLICE = ("per slice: Dice and IoU averaged over the slices whose truth holds tumour (tumour-free slices are "
             "not scored; false_positive_slices counts those with any predicted tumour)")
LEAST_CONFIDENT = 5   # cases summary.json, the printed table and predict.py name as the least confident


def write_csv(path, rows):
    """A list of dicts with the same keys as one CSV table, header from the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_reports(out_dir, results, split, extra, region_names=("WT", "TC", "ET")):
    """per_case.csv and summary.json from `results`, a list of (case_id, scores, confidence) with
    confidence None where it was not computed; a binary task's per-case "slices" figures are pooled
    into summary["per_slice"], lesion-wise figures (lesions.LESION_KEYS, when scored) are averaged
    except the lesion counts, which are summed, and each figure says how it was computed. The
    confidence figures are confidence_summary's."""
    rows = [{"case": cid, "confidence": "" if confidence is None else round(confidence, 5),
             **{f"{r}_{m}": "" if v is None else round(v, 5) for r, s in scores.items() for m, v in s.items()}}
            for cid, scores, confidence in results]
    write_csv(os.path.join(out_dir, "per_case.csv"), rows)
    all_scores = [scores for _, scores, _ in results]
    summary = {"split": split, "cases": len(results), **extra,
               "regions": summarise(all_scores, list(region_names), LESION_COUNTS),
               **confidence_summary(results, region_names)}
    if results and "lesion_dice" in all_scores[0].get(region_names[0], {}):
        summary["lesion_scoring"] = scoring_parameters()
    if results and "slices" in all_scores[0]:
        summary["regions_scoring"] = PER_PATIENT
        summary["per_slice"] = {"scoring": PER_SLICE, **pool_slice_scores([s["slices"] for s in all_scores])}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def confidence_summary(results, region_names):
    """{"least_confident": [{"case", "confidence"}], lowest first} over the (case_id, scores,
    confidence) results that have a confidence, and on labelled ones "confidence_rank_correlation":
    Spearman's rho between confidence and the true Dice, for the case's mean Dice over regions
    ("mean_dice") and per region (None with under 3 cases or no spread). {} without confidences."""
    known = [(cid, scores, c) for cid, scores, c in results if c is not None]
    if not known:
        return {}
    per_case = {cid: c for cid, _, c in known}
    out = {"least_confident": [{"case": cid, "confidence": round(per_case[cid], 5)}
                               for cid in least_confident(per_case, LEAST_CONFIDENT)]}
    if all(scores for _, scores, _ in known):
        confidence = [c for _, _, c in known]
        dice = {r: [scores[r]["dice"] for _, scores, _ in known] for r in region_names}
        out["confidence_rank_correlation"] = {
            "mean_dice": rank_correlation(confidence, np.mean([dice[r] for r in region_names], axis=0)),
            **{r: rank_correlation(confidence, dice[r]) for r in region_names}}
    return out


def write_confidence(out_dir, per_case):
    """confidence.csv (case, confidence) in `out_dir`, one row per case of {case_id: confidence} in
    its order (nothing is written without cases); returns summary.json's "least_confident" list."""
    if per_case:
        write_csv(os.path.join(out_dir, "confidence.csv"),
                  [{"case": cid, "confidence": round(c, 5)} for cid, c in per_case.items()])
    return confidence_summary([(cid, {}, c) for cid, c in per_case.items()], ()).get("least_confident", [])


def format_confidence(summary):
    """The printed lines on confidence: the least confident cases and, on labelled data, how well
    confidence ranks the true Dice."""
    lines = []
    if summary.get("least_confident"):
        lines.append("least confident (no labels needed): "
                     + ", ".join(f"{c['case']} {c['confidence']:.3f}" for c in summary["least_confident"]))
    rho = summary.get("confidence_rank_correlation")
    if rho:
        figures = ", ".join(f"{k if k != 'mean_dice' else 'mean Dice'} {'n/a' if v is None else f'{v:.2f}'}"
                            for k, v in rho.items())
        lines.append(f"confidence against true Dice, Spearman rho: {figures}")
    return lines


def format_table(summary):
    """The printed summary of an evaluation: one row per region, one column per metric."""
    first = next(iter(summary["regions"].values()), {})
    metrics = [m for m in METRICS if m in first]
    per_slice = summary.get("per_slice")
    scoring = "per-patient scores (slices stacked, 3D counts), means over patients" if per_slice else "means over cases"
    lines = [f"{summary['split']} split, {summary['cases']} cases: {scoring}",
             f"{'region':<8}" + "".join(f"{m:>13}" for m in metrics)]
    for region, values in summary["regions"].items():
        lines.append(f"{region:<8}" + "".join(f"{values.get(m, float('nan')):>13.4f}" for m in metrics))
    if "lesion_scoring" in summary:
        lesion = [m for m in LESION_KEYS if m in first]
        lines.append("lesion-wise (BraTS 2023): Dice and HD95 means over cases, lesion counts summed")
        lines.append(f"{'region':<8}" + "".join(f"{m:>16}" for m in lesion))
        for region, values in summary["regions"].items():
            lines.append(f"{region:<8}" + "".join(f"{values[m]:>16.4f}" if m not in LESION_COUNTS
                                                  else f"{values[m]:>16d}" for m in lesion))
    if per_slice:
        dice, iou = (per_slice[k] for k in ("dice_over_tumour_slices", "iou_over_tumour_slices"))
        lines.append(f"per-slice over {per_slice['tumour_slices']} tumour-containing slices: "
                     + (f"Dice {dice:.4f}, IoU {iou:.4f}" if dice is not None else "none to score"))
        lines.append(f"false-positive slices: {per_slice['false_positive_slices']} of "
                     f"{per_slice['empty_slices']} tumour-free slices have predicted tumour")
    return "\n".join(lines + format_confidence(summary))
