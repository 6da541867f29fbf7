"""Test fixture: where the shared real BraTS cases are, and their conversion with prepare_data.py."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS_SAMPLE = os.path.join(ROOT, "..", "shared", "data", "brats18-sample")
SKIP_REASON = f"real BraTS sample not found at {BRATS_SAMPLE} (see shared/data/README.md)"


def sample_cases():
    if not os.path.isdir(BRATS_SAMPLE):
        return []
    return sorted(d for d in os.listdir(BRATS_SAMPLE) if os.path.isdir(os.path.join(BRATS_SAMPLE, d)))


def source_seg_path(case_id):
    return os.path.join(BRATS_SAMPLE, case_id, f"{case_id}_seg.nii.gz")


def convert_all(out_dir):
    """Convert the shared cases with the project's own converter (prepare_data.py brats)."""
    import prepare_data
    prepare_data.main(["brats", BRATS_SAMPLE, out_dir])
    return out_dir
