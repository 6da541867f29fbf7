"""The 2D path on Kaggle LGG: a kaggle_3m fixture converted, trained with the lgg2d preset for an
epoch and evaluated; per-patient, per-slice and false-positive-slice figures on hand-made cases."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from cases.splits import list_cases
from config import build_config, check
from conftest import ROOT
from dataset import SliceDataset, build_dataset, pick_slice
from evaluate import evaluate_checkpoint, format_table
from evaluation.inference import predict_slices
from evaluation.metrics import pool_slice_scores, slice_scores
from evaluation.postprocess import label_map_regions
from layout_fixtures import write_lgg_patient
from main import train_and_evaluate
from prepare_data import main as prepare_main

REAL_LGG = os.path.join(ROOT, "..", "shared", "data", "lgg-sample", "kaggle_3m")
PATIENTS = [f"TCGA_XX_{i:04d}_2000010{i}" for i in range(5)]
# the preset with tiny shapes: 32x32 slices, a 4-wide UNet of depth 2, one epoch
TINY = {"data.image_size": "32,32", "model.base_channels": "4", "model.depth": "2", "train.epochs": "1",
        "train.batch_size": "8", "eval.batch_size": "8", "data.val_fraction": "0.2", "data.test_fraction": "0.2",
        "data.num_workers": "0"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared: one thread is the fast setting
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lgg_h5(tmp_path_factory):
    """Five patients of 8 slices of 64x64 in the exact kaggle_3m layout, converted with prepare_data.py."""
    root = tmp_path_factory.mktemp("lgg")
    for i, patient in enumerate(PATIENTS):
        write_lgg_patient(str(root), patient, n_slices=8, size=64, seed=i)
    out = root / "h5"
    prepare_main(["lgg", str(root / "kaggle_3m"), str(out)])
    return str(out)


def lgg_config(data_dir, tmp_path, **extra):
    return build_config({**TINY, "data.dir": data_dir, "train.out_dir": str(tmp_path / "runs"), **extra},
                        preset="lgg2d")


@pytest.fixture(scope="module")
def lgg_run(lgg_h5, tmp_path_factory):
    """One epoch of the lgg2d preset (tiny shapes) on the fixture; main.train_and_evaluate also scores the test split."""
    cfg = lgg_config(lgg_h5, tmp_path_factory.mktemp("run"), **{"train.name": "lgg"})
    return train_and_evaluate(check(cfg))


def test_conversion_keeps_patients_slices_and_binary_masks(lgg_h5):
    import h5py

    paths = list_cases(lgg_h5)
    assert [os.path.basename(p)[:-3] for p in paths] == sorted(PATIENTS)
    with h5py.File(paths[0]) as f:
        assert f["image"].shape == (3, 8, 64, 64) and f["mask"].shape == (8, 64, 64)
        assert set(np.unique(f["mask"][()])) == {0, 1}


def test_preset_trains_an_epoch_and_scores_per_patient(lgg_run):
    run_dir = lgg_run
    split = json.load(open(os.path.join(run_dir, "split.json")))
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(PATIENTS) and len(set.union(*parts)) == len(PATIENTS)  # no patient twice
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    assert len(rows) == 1 and "val_dice_tumour" in rows[0] and "val_dice_wt" not in rows[0]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["task"] == "binary" and summary["cases"] == len(split["test"])
    assert set(summary["regions"]) == {"tumour"} and "hd95" not in summary["regions"]["tumour"]
    assert "per patient" in summary["regions_scoring"]
    per_slice = summary["per_slice"]
    assert per_slice["tumour_slices"] + per_slice["empty_slices"] == 8 * len(split["test"])
    assert 0 <= per_slice["false_positive_slices"] <= per_slice["empty_slices"]
    assert "false-positive slices" in format_table(summary)


def test_evaluation_dice_and_iou_agree_per_patient(lgg_h5, lgg_run, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate_checkpoint(os.path.join(lgg_run, "last.pt"), "all", str(out), {"data.dir": lgg_h5},
                                  overlays=True, save_predictions=True)
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert summary["cases"] == len(rows) == len(PATIENTS)
    for row in rows:  # one patient's Dice and IoU come from the same counts: Dice = 2 IoU / (1 + IoU)
        dice, iou = float(row["tumour_dice"]), float(row["tumour_iou"])
        assert dice == pytest.approx(2 * iou / (1 + iou), abs=1e-4)
    assert {"slices_tumour_slices", "slices_false_positive_slices"} <= set(rows[0])
    assert len(os.listdir(out / "overlays")) == len(PATIENTS)
    import h5py
    with h5py.File(out / "predictions" / f"{PATIENTS[0]}.h5") as f:
        assert f["mask"].shape == (8, 64, 64) and set(np.unique(f["mask"][()])) <= {0, 1}


def test_slice_scores_on_a_hand_made_case():
    truth = np.zeros((5, 4, 4), bool)
    pred = np.zeros((5, 4, 4), bool)
    truth[0, :2, :2] = True                      # tumour slice, predicted exactly: Dice 1, IoU 1
    pred[0, :2, :2] = True
    truth[1, :2, :2] = True                      # tumour slice, half found: Dice 2*2/(4+2)=2/3, IoU 2/4
    pred[1, :1, :2] = True
    pred[2, 3, 3] = True                         # empty slice with one predicted pixel: a false positive
    # slices 3 and 4: empty and predicted empty (counted, never scored as Dice 1)
    scores = slice_scores(pred, truth)
    assert scores["tumour_slices"] == 2 and scores["empty_slices"] == 3 and scores["false_positive_slices"] == 1
    assert scores["dice"] == pytest.approx((1 + 2 / 3) / 2) and scores["iou"] == pytest.approx((1 + 0.5) / 2)
    other = {"tumour_slices": 1, "dice": 0.0, "iou": 0.0, "empty_slices": 4, "false_positive_slices": 2}
    pooled = pool_slice_scores([scores, other])
    assert pooled["dice_over_tumour_slices"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert pooled["empty_slices"] == 7 and pooled["false_positive_slices"] == 3
    empty = slice_scores(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    assert empty["dice"] is None and empty["false_positive_slices"] == 0


def test_largest_component_keeps_only_the_biggest_blob():
    pred = np.zeros((1, 4, 8, 8), bool)
    pred[0, 1:3, 1:4, 1:4] = True                # 18 voxels
    pred[0, 0, 6, 6] = True                      # a stray voxel
    pred[0, 3, 6:8, 0:2] = True                  # 4 voxels
    eval_cfg = build_config({"eval.largest_component": "true"}).eval
    kept = label_map_regions(pred, "binary", eval_cfg)
    assert kept.sum() == 18 and kept[0, 1:3, 1:4, 1:4].all() and pred.sum() == 23  # input left alone
    assert not label_map_regions(np.zeros((1, 2, 2, 2), bool), "binary", eval_cfg).any()


def test_slice_sampling_honours_the_tumour_fraction():
    tumour = np.array([False, True, True, False, False])
    for fraction, expected in ((1.0, True), (0.0, False)):
        picks = [pick_slice(tumour, fraction, torch.Generator().manual_seed(i)) for i in range(40)]
        assert all(tumour[p] == expected for p in picks)
    half = [tumour[pick_slice(tumour, 0.5, torch.Generator().manual_seed(i))] for i in range(400)]
    assert 0.4 < np.mean(half) < 0.6
    assert pick_slice(np.zeros(3, bool), 1.0, torch.Generator().manual_seed(0)) in range(3)


def test_slice_datasets_serve_2d_samples(lgg_h5, tmp_path):
    cfg = lgg_config(lgg_h5, tmp_path, **{"data.slices_per_case": "3", "data.foreground_fraction": "1",
                                           "data.augment": "false"})
    paths = list_cases(lgg_h5)
    train = build_dataset(cfg.data, paths[:2])
    assert isinstance(train, SliceDataset) and len(train) == 6
    sample = train[4]
    assert sample["image"].shape == (3, 32, 32) and sample["target"].shape == (1, 32, 32)
    assert all(train[i]["target"].any() for i in range(len(train)))  # fraction 1: tumour slices only
    assert torch.equal(train[4]["image"], sample["image"])  # a pure function of (seed, epoch, index)
    ids = [train[i]["case_id"] for i in range(len(train))]  # 3 slices of each case, the cases in order
    assert ids == [os.path.basename(paths[0])[:-3]] * 3 + [os.path.basename(paths[1])[:-3]] * 3


def test_predict_slices_returns_native_size():
    image = torch.rand(3, 5, 40, 24) * 100

    def predictor(batch):  # logits: +10 where the first channel is above its mean
        return (batch[:, :1] > 0).float() * 20 - 10

    probs = predict_slices(predictor, image, (16, 16), batch_size=2)
    assert probs.shape == (1, 5, 40, 24) and 0 <= probs.min() and probs.max() <= 1
    same = predict_slices(predictor, image, (40, 24), batch_size=3)
    from transforms.normalise import zscore_brain
    assert torch.equal(same[0] > 0.5, zscore_brain(image)[0] > 0)


def test_task_checks_name_the_fix(tmp_path):
    cfg = lgg_config("unused", tmp_path, **{"model.out_channels": "3"})
    with pytest.raises(ValueError, match="out_channels"):
        check(cfg)
    cfg = lgg_config("unused", tmp_path, **{"data.mode": "resize"})
    with pytest.raises(ValueError, match="slices"):
        check(cfg)


@pytest.mark.skipif(not os.path.isdir(REAL_LGG), reason=f"real LGG sample not found at {REAL_LGG}")
def test_real_lgg_patients_convert_with_their_slice_counts(tmp_path):
    import h5py

    prepare_main(["lgg", REAL_LGG, str(tmp_path)])
    expected = {"TCGA_CS_4941_19960909": (23, 8), "TCGA_FG_6692_20020606": (26, 7),
                "TCGA_HT_7877_19980917": (30, 9)}
    for patient, (slices, with_tumour) in expected.items():
        with h5py.File(tmp_path / f"{patient}.h5") as f:
            assert f["image"].shape == (3, slices, 256, 256)
            mask = f["mask"][()]
        assert mask.shape == (slices, 256, 256) and set(np.unique(mask)) == {0, 1}
        assert int(mask.reshape(slices, -1).any(1).sum()) == with_tumour


def test_under_a_budget_the_presets_network_size_batch_and_lr_are_the_plans_starting_point():
    from config import PRESET_PLANNABLE, explicit_keys
    pairs = {"train.max_minutes": "30", "model.base_channels": "24"}
    explicit = explicit_keys(build_config(pairs, "lgg2d"), pairs, "lgg2d")
    assert not (set(PRESET_PLANNABLE) - {"model.base_channels"}) & set(explicit)  # the plan may change them
    assert explicit["model.base_channels"] == 24 and explicit["data.mode"] == "slices"  # typed, or not planned
    unbudgeted = explicit_keys(build_config({}, "lgg2d"), {}, "lgg2d")  # no budget: the preset's recipe stays
    assert unbudgeted["data.image_size"] == (256, 256) and unbudgeted["model.base_channels"] == 32


def test_a_budgeted_lgg2d_run_plans_the_2d_recipe_trains_and_scores(lgg_h5, tmp_path):
    import main
    main.main(["--preset", "lgg2d", "--data.dir", lgg_h5, "--train.max_minutes", "0.15", "--train.out_dir",
               str(tmp_path), "--train.name", "planned", "--model.base_channels", "4", "--data.num_workers", "0",
               "--data.val_fraction", "0.2", "--data.test_fraction", "0.2", "--eval.batch_size", "8"])
    run_dir = tmp_path / "planned"
    saved = json.loads((run_dir / "plan.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    values, why = saved["values"], saved["why"]
    assert values["data.image_size"] in ([64, 64], [48, 48], [32, 32])  # from the cases' 64x64, not the preset's 256
    assert (values["model.in_channels"], values["data.slice_context"], values["train.lr"]) == (9, 1, 1e-3)
    assert values["model.base_channels"] == 4 and why["model.base_channels"] == "set explicitly"  # typed: kept
    assert "data.image_size" not in saved["inputs"]["explicit"] and "train.lr" not in saved["inputs"]["explicit"]
    assert all(why[key] for key in values) and "width^" in why["speed"]
    assert [p["base_channels"] for p in saved["inputs"]["speed"]["points"]] == [4]  # the typed width alone timed
    assert config["model"]["in_channels"] == 9 and config["data"]["image_size"] == values["data.image_size"]
    assert config["train"]["lr"] == 1e-3 and config["train"]["schedule"] == "poly"
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["task"] == "binary" and summary["cases"] == 1  # the test patient, scored at 64x64
    assert saved["steps"]["made"] >= 1
