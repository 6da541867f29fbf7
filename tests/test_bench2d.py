"""bench2d: the parts of a 2D epoch are timed on a real training set and add up to the epoch."""
import pytest

from benchmarks.bench2d import format_timing, time_2d_epoch
from config import build_config, check
from layout_fixtures import write_lgg_patient
from prepare_data import main as prepare_main


@pytest.fixture
def lgg_h5(tmp_path):
    for i in range(5):
        write_lgg_patient(str(tmp_path), f"TCGA_BB_{i:04d}_20030303", n_slices=5, size=32, seed=i)
    prepare_main(["lgg", str(tmp_path / "kaggle_3m"), str(tmp_path / "h5")])
    return str(tmp_path / "h5")


def test_an_epoch_is_split_into_data_step_and_validation(lgg_h5):
    cfg = check(build_config({"data.dir": lgg_h5, "data.image_size": "16,16", "model.base_channels": "4",
                              "model.depth": "2", "train.batch_size": "4", "data.val_fraction": "0.2",
                              "data.test_fraction": "0.2", "data.slice_context": "1", "model.in_channels": "9"},
                             preset="lgg2d"))
    timing = time_2d_epoch(cfg, steps=3, val_cases=1)
    assert timing["train_cases"] == 3 and timing["val_cases"] == 1 and timing["steps_per_epoch"] == 4  # 15 slices / 4
    for clock in ("wall", "cpu"):
        t = timing[clock]
        assert set(t["shares"]) == {"data", "step", "validation"}
        assert sum(t["shares"].values()) == pytest.approx(1.0)
        assert t["step_s_per_step"] > 0 and t["validation_s_per_case"] > 0
        expected = (t["data_s_per_step"] + t["step_s_per_step"]) * 4 + t["validation_s_per_case"]
        assert t["cached_epoch_s"] == pytest.approx(expected)
    lines = format_timing(timing).splitlines()
    assert len(lines) == 3 and lines[1].lstrip().startswith("wall:") and lines[2].lstrip().startswith("cpu:")


def test_only_the_slices_mode_is_timed():
    with pytest.raises(ValueError, match="bench.py"):
        time_2d_epoch(check(build_config({})))
