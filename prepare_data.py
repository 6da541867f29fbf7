"""Convert a dataset, in the layout you have, into the project's HDF5 layout (one .h5 per case).

    python prepare_data.py brats          SRC OUT   # BraTS NIfTI case folders (2018-21 or 2023+ naming)
    python prepare_data.py kaggle-slices  SRC OUT   # Kaggle BraTS2020 volume_<v>_slice_<s>.h5 files
    python prepare_data.py lgg            SRC OUT   # Kaggle LGG kaggle_3m/<patient>/<patient>_<n>.tif
    python prepare_data.py h5             SRC OUT [--image-key raw --mask-key label --label-map 3:4 ...]
    python prepare_data.py synthetic      OUT --cases N

A bad case is skipped with its reason and the rest go on; the exit code is 1 when any was skipped.
Each file is written under a temporary name and renamed, so an interrupted run loses nothing
already written; run it again to finish (existing outputs are kept unless --overwrite).
"""
import argparse
import logging
import os
import sys

from tqdm import tqdm

from cases.h5 import CaseFormat, DataError, parse_label_map, write_case
from conversion import layouts as convert
from conversion import nifti

log = logging.getLogger("prepare_data")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("brats", "BraTS NIfTI case folders"), ("kaggle-slices", "Kaggle BraTS2020 slice .h5"),
                            ("lgg", "Kaggle LGG TIFF slices"), ("h5", "any folder of per-case .h5 files")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("src", help="source folder (searched recursively except for h5)")
        sub.add_argument("out", help="output folder for <case>.h5 files")
        sub.add_argument("--overwrite", action="store_true", help="rewrite cases already in OUT")
        if name in ("brats", "kaggle-slices"):
            sub.add_argument("--no-crop", action="store_true", help="keep the full grid (default: crop to the brain)")
        if name == "kaggle-slices":
            sub.add_argument("--modalities", default=",".join(convert.MODALITIES),
                             help="names of the 4 image channels, in file order")
    h5 = commands.choices["h5"]
    h5.add_argument("--image-key", default="image", help="dataset holding the image (e.g. raw)")
    h5.add_argument("--mask-key", default="mask", help="dataset holding the mask (e.g. label)")
    h5.add_argument("--channels", type=int, default=4, help="expected image channels")
    h5.add_argument("--channel-last", default="auto", choices=["auto", "true", "false"],
                    help="image axis order; auto detects when only one end has --channels")
    h5.add_argument("--label-map", default="", help="label renaming, e.g. 3:4 for BraTS 2023 labels")
    h5.add_argument("--labels", default="0,1,2,4", help="label values allowed after mapping")
    h5.add_argument("--image-only", action="store_true", help="files have no mask (unlabelled cases)")
    synthetic = commands.add_parser("synthetic", help="generate synthetic BraTS-like cases")
    synthetic.add_argument("out", help="output folder")
    synthetic.add_argument("--cases", type=int, default=40, help="number of cases")
    synthetic.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    return parser.parse_args(argv)


def sources_and_reader(args):
    """[(case_id, source)] and a function source -> Case, for the chosen layout."""
    crop = not getattr(args, "no_crop", False)
    if args.command == "brats":
        convert.require("nibabel", "reading NIfTI")  # fail before the progress bar, not inside it
        return nifti.find_brats(args.src), lambda folder: nifti.read_brats(folder, crop)
    if args.command == "kaggle-slices":
        modalities = [m.strip() for m in args.modalities.split(",")]
        return convert.find_kaggle_slices(args.src), lambda s: convert.read_kaggle_volume(s, crop, modalities)
    if args.command == "lgg":
        convert.require("tifffile", "reading TIFF")
        return convert.find_lgg(args.src), convert.read_lgg
    fmt = CaseFormat(image_key=args.image_key, mask_key=args.mask_key, channels=args.channels,
                     channel_last=args.channel_last, label_map=parse_label_map(args.label_map),
                     labels=convert.label_set(args.labels))
    return convert.find_h5(args.src), lambda path: convert.read_h5(path, fmt, with_mask=not args.image_only)


def convert_all(sources, read, out_dir, overwrite):
    """Write each case; returns (written, kept, skipped reasons)."""
    written, kept, skipped = 0, 0, []
    for case_id, source in tqdm(sources, desc="convert", unit="case", dynamic_ncols=True):
        out = os.path.join(out_dir, f"{case_id}.h5")
        if os.path.exists(out) and not overwrite:
            kept += 1
            continue
        try:
            case = read(source)
        except DataError as err:
            log.warning("skipped %s: %s", case_id, err)
            skipped.append(f"{case_id}: {err}")
            continue
        write_case(out, case.image, case.mask, case.spacing, **case.attrs)
        written += 1
    return written, kept, skipped


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "synthetic":
            from cases.synthetic import generate_dataset
            paths = generate_dataset(args.out, args.cases, seed=args.seed)
            print(f"wrote {len(paths)} synthetic cases to {args.out}")
            return
        sources, read = sources_and_reader(args)
        os.makedirs(args.out, exist_ok=True)
        written, kept, skipped = convert_all(sources, read, args.out, args.overwrite)
    except (DataError, ImportError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"{args.command}: wrote {written} cases to {args.out}"
          + (f", kept {kept} already there" if kept else "") + f", skipped {len(skipped)}"
          + "".join(f"\n  skipped {reason}" for reason in skipped))
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    main()
