"""Predict new patients in one command: a folder of raw cases in, one label map per case out.

    python predict.py -i IN -o OUT -c RUN/best.pt [-c RUN2/best.pt ...] [--mirror] [--device cpu|cuda]
                      [--no-overlays] [--data.image_key KEY ...]

IN holds BraTS NIfTI case folders (2018-21 or 2023+ file names, directly in IN or nested such as
HGG/<case>/; read and checked as `prepare_data.py brats` reads them, in memory, nothing converted),
or .h5 cases (the project's layout, or your own read with data.* keys such as --data.image_key raw).
No labels are needed. Each case gets OUT/<case>.nii.gz for NIfTI input (the source grid, affine and
axis order) or OUT/<case>.h5, and an overlay OUT/overlays/<case>.png unless --no-overlays. Labels:
1 necrosis, 2 edema, and enhancing tumour as the case's BraTS convention has it: 3 for 2023+ file
names (or an .h5 converted from them, or named like BraTS-GLI-00000-000), 4 for 2018-21 names,
else eval.enhancing_label. OUT/confidence.csv gives each case a confidence in [0, 1] computed
without labels (docs/evaluation.md): the least confident cases, named in the log, are the ones to
check first. Every file is written atomically.

Several -c are an ensemble: the mean of their probabilities, each model predicting with its own
config (mode, sizes) at the case's native grid, thresholded and postprocessed with the first one's
eval.* keys. A -c run folder means its best.pt, or for a cross-validation run every fold_<i>/best.pt.
A case that cannot be read or predicted is reported in one line and skipped; the exit code is 1
when any was. Under torchrun (`torchrun --nproc_per_node=N predict.py ...`) rank i predicts cases
i, i+N, ...
"""
import argparse
import glob
import logging
import os
import sys

from tqdm import tqdm

from cases.h5 import DataError, case_format, case_id_of, read_case
from conversion import nifti
from conversion.layouts import require
from evaluation.checkpoints import load_members
from evaluation.ensemble import confidence_of, predict_probabilities
from evaluation.export import enhancing_label, flair_channel, save_label_map, save_overlay
from evaluation.postprocess import predicted_regions, to_label_map
from evaluation.reports import write_confidence
from overrides import split_args
from runtime import distributed
from runtime.checkpoint import CheckpointError
from transforms.regions import task_regions

log = logging.getLogger("predict")


def find_inputs(src, fmt):
    """[(case_id, source, read)]: the .h5 cases of src, else its BraTS NIfTI case folders;
    read() returns the unlabelled cases.Case."""
    if not os.path.isdir(src):
        raise DataError(f"{src}: input folder does not exist")
    h5_paths = sorted(glob.glob(os.path.join(src, "*.h5")))
    if h5_paths:
        return [(case_id_of(p), p, lambda p=p: read_case(p, fmt, with_mask=False)) for p in h5_paths]
    try:
        folders = nifti.find_brats(src)
    except DataError as err:
        raise DataError(f"{err}; predict.py reads .h5 cases or BraTS NIfTI case folders") from None
    require("nibabel", "reading NIfTI")  # fail once, before the progress bar
    return [(case_id, folder, lambda f=folder: nifti.read_brats(f, crop=True, with_mask=False))
            for case_id, folder in folders]


def predict_one(members, case, out_dir, overlay):
    """Write the label map (and overlay) of one case; returns its confidence (no labels needed;
    an ensemble's counts its members' agreement)."""
    cfg = members[0].cfg
    task = cfg.data.task
    probs, masks = predict_probabilities(members, case, members[0].device, with_masks=True)
    regions = predicted_regions(probs, task, cfg.eval)
    labels = to_label_map(regions, task, enhancing_label(case, cfg.eval.enhancing_label))
    save_label_map(out_dir, case.case_id, labels, case.attrs, case.spacing)
    if overlay:
        save_overlay(os.path.join(out_dir, "overlays", f"{case.case_id}.png"), case.image[flair_channel(case.attrs)],
                     regions, None, case.case_id, list(task_regions(task)))
    return confidence_of(probs, cfg.eval.threshold, masks)


def predict_all(members, cases, out_dir, overlays=True):
    """Predict every (case_id, source, read) in turn; returns the one-line reasons of the cases
    skipped and {case_id: confidence} of those predicted."""
    failed, confidence = [], {}
    for case_id, source, read in tqdm(cases, desc="predict", unit="case", dynamic_ncols=True,
                                      disable=not distributed.is_main()):
        try:
            confidence[case_id] = predict_one(members, read(), out_dir, overlays)
        except (DataError, OSError, ValueError) as err:
            reason = str(err) if source in str(err) else f"{source}: {err}"
            log.error("skipped %s: %s", case_id, reason)
            failed.append(f"{case_id}: {reason}")
    return failed, confidence


def report_confidence(out_dir, confidence):
    """Rank 0: confidence.csv in `out_dir` and a log line naming the least confident cases."""
    least = write_confidence(out_dir, confidence)
    if least:
        log.info("least confident cases (check these first): %s; every case's confidence in %s",
                 ", ".join(f"{c['case']} {c['confidence']:.3f}" for c in least), os.path.join(out_dir, "confidence.csv"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, help="folder of cases: BraTS NIfTI case folders or .h5 files")
    parser.add_argument("-o", "--output", required=True, help="folder for <case>.nii.gz / <case>.h5 and overlays/")
    parser.add_argument("-c", "--checkpoint", action="append", required=True,
                        help="best.pt, or a run folder (its best.pt or its fold_<i>/best.pt); repeat to ensemble")
    parser.add_argument("--mirror", action="store_true", help="test-time augmentation: average over axis flips")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to predict (default: each checkpoint's train.device, CUDA when available)")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="write no overlay PNGs")
    return parser.parse_args(argv)


def main(argv=None):
    pairs, rest = split_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(rest)
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING, format="%(message)s")
    if args.mirror:
        pairs["eval.mirror"] = "true"
    if args.device:
        pairs["train.device"] = args.device
    try:
        device = distributed.init_from_env(pairs.get("train.device", "auto"))
        members = load_members(args.checkpoint, device, pairs)
        cases = find_inputs(args.input, case_format(members[0].cfg.data))
        os.makedirs(args.output, exist_ok=True)
        log.info("predicting %d cases with %d model(s) on %s", len(cases), len(members), device)
        rank, world = distributed.rank(), distributed.world_size()
        shards = distributed.gather_objects(predict_all(members, cases[rank::world], args.output, args.overlays))
        failed = [reason for shard_failed, _ in shards for reason in shard_failed]
        if distributed.is_main():
            by_case = {cid: c for _, shard in shards for cid, c in shard.items()}
            report_confidence(args.output, {cid: by_case[cid] for cid, _, _ in cases if cid in by_case})
    except (DataError, CheckpointError, KeyError, ValueError, ImportError, OSError, RuntimeError) as err:
        sys.exit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")
    finally:
        distributed.cleanup()
    if distributed.is_main():
        print(f"predicted {len(cases) - len(failed)} of {len(cases)} cases into {args.output}"
              + "".join(f"\n  skipped {reason}" for reason in failed))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
