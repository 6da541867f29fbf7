"""What a run and an evaluation write for people to read: CSV tables (metrics.csv, per_case.csv),
the training curves (curves.png), summary.json and the printed summary table. Files are written
atomically.
"""
import csv
import io
import os

from evaluation.lesions import LESION_COUNTS, LESION_KEYS, scoring_parameters
from evaluation.metrics import METRICS, pool_slice_scores, summarise
from runtime.atomic import write_json, write_text

PER_PATIENT = ("per patient: each patient's slices stacked into one volume, voxel counts summed, Dice and "
               "IoU from those counts; mean over patients")
PER_SLICE = ("per slice: Dice and IoU averaged over the slices whose truth holds tumour (tumour-free slices are "
             "not scored; false_positive_slices counts those with any predicted tumour)")


def write_csv(path, rows):
    """A list of dicts with the same keys as one CSV table, header from the first row's keys."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_reports(out_dir, results, split, extra, region_names=("WT", "TC", "ET")):
    """per_case.csv and summary.json; a binary task's per-case "slices" figures are pooled into
    summary["per_slice"], lesion-wise figures (lesions.LESION_KEYS, when scored) are averaged
    except the lesion counts, which are summed, and each figure says how it was computed."""
    rows = [{"case": cid, **{f"{r}_{m}": "" if v is None else round(v, 5) for r, s in scores.items()
                             for m, v in s.items()}} for cid, scores in results]
    write_csv(os.path.join(out_dir, "per_case.csv"), rows)
    summary = {"split": split, "cases": len(results), **extra,
               "regions": summarise([scores for _, scores in results], list(region_names), LESION_COUNTS)}
    if results and "lesion_dice" in results[0][1].get(region_names[0], {}):
        summary["lesion_scoring"] = scoring_parameters()
    if results and "slices" in results[0][1]:
        summary["regions_scoring"] = PER_PATIENT
        summary["per_slice"] = {"scoring": PER_SLICE, **pool_slice_scores([s["slices"] for _, s in results])}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


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
    return "\n".join(lines)
