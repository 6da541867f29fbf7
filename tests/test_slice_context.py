"""2.5D input (data.slice_context): neighbouring slices as extra channels, in a fixed order, with the
edge slice repeated at the volume's edges; the training samples and predict_slices stack them the same way."""
import os

import pytest
import torch

import dataset
from cases.h5 import case_format, read_case
from cases.splits import list_cases
from config import build_config, check
from dataset import SliceDataset, build_dataset
from evaluation.inference import predict_slices
from layout_fixtures import write_lgg_patient
from main import train_and_evaluate
from prepare_data import main as prepare_main
from transforms.context import context_indices, slice_with_context

PATIENTS = [f"TCGA_YY_{i:04d}_2001010{i}" for i in range(5)]
TINY = {"data.image_size": "16,16", "model.base_channels": "4", "model.depth": "2", "train.epochs": "1",
        "train.batch_size": "4", "eval.batch_size": "3", "data.val_fraction": "0.2", "data.test_fraction": "0.2",
        "data.num_workers": "0", "data.augment": "false"}


@pytest.fixture(scope="module")
def lgg_h5(tmp_path_factory):
    """Five patients of 6 slices of 24x24 in the kaggle_3m layout, converted with prepare_data.py."""
    root = tmp_path_factory.mktemp("lgg_context")
    for i, patient in enumerate(PATIENTS):
        write_lgg_patient(str(root), patient, n_slices=6, size=24, seed=i)
    prepare_main(["lgg", str(root / "kaggle_3m"), str(root / "h5")])
    return str(root / "h5")


def context_config(data_dir, tmp_path, context=1, **extra):
    pairs = {**TINY, "data.dir": data_dir, "train.out_dir": str(tmp_path / "runs"), "data.slice_context": str(context),
             "model.in_channels": str(3 * (2 * context + 1)), **extra}
    return check(build_config(pairs, preset="lgg2d"))


@pytest.mark.parametrize("depth, z, context, expected", [
    (5, 2, 1, [1, 2, 3]),
    (5, 0, 2, [0, 0, 0, 1, 2]),     # before the first slice: the first slice repeats
    (5, 4, 2, [2, 3, 4, 4, 4]),     # after the last slice: the last slice repeats
    (1, 0, 1, [0, 0, 0]),
    (4, 3, 0, [3]),                 # no context: the slice alone
])
def test_context_indices_clamp_to_the_volume(depth, z, context, expected):
    assert context_indices(depth, z, context) == expected


def test_channels_are_ordered_slice_by_slice_each_with_its_channels():
    channels, depth = 3, 5
    volume = torch.zeros(channels, depth, 2, 2)
    for c in range(channels):
        for z in range(depth):
            volume[c, z] = 10 * z + c  # every pixel says which (slice, channel) it came from
    for z in range(depth):
        stacked = slice_with_context(volume, z, 2)
        assert stacked.shape == (5 * channels, 2, 2)
        for j, source_z in enumerate(context_indices(depth, z, 2)):
            for c in range(channels):
                assert torch.all(stacked[j * channels + c] == 10 * source_z + c), (z, j, c)
    assert torch.equal(slice_with_context(volume, 3, 0), volume[:, 3])


def every_slice(ds, monkeypatch):
    """The samples of slices 0, 1, ... of the dataset's first case, as training draws them."""
    samples = []
    for z in range(ds.prepared(0)[0].shape[1]):
        monkeypatch.setattr(dataset, "pick_slice", lambda tumour, fraction, gen, z=z: z)
        samples.append(ds[0])
    return samples


def test_slice_dataset_serves_neighbours_with_repeated_edges(lgg_h5, tmp_path, monkeypatch):
    cfg = context_config(lgg_h5, tmp_path, context=1)
    paths = list_cases(lgg_h5)
    ds = build_dataset(cfg.data, paths[:1])
    assert isinstance(ds, SliceDataset) and len(ds) == 6
    volume = ds.prepared(0)[0]  # (3, 6, 16, 16): the patient's normalised, resized slices
    samples = every_slice(ds, monkeypatch)
    first, middle, last = samples[0]["image"], samples[2]["image"], samples[5]["image"]
    assert first.shape == (9, 16, 16) and samples[0]["target"].shape == (1, 16, 16)
    assert torch.equal(middle, torch.cat([volume[:, 1], volume[:, 2], volume[:, 3]]))
    assert torch.equal(first, torch.cat([volume[:, 0], volume[:, 0], volume[:, 1]]))  # slice 0 stands in for -1
    assert torch.equal(last, torch.cat([volume[:, 4], volume[:, 5], volume[:, 5]]))   # slice 5 stands in for 6
    train = build_dataset(context_config(lgg_h5, tmp_path, context=2, **{"data.augment": "true"}).data, paths)
    assert train[7]["image"].shape == (15, 16, 16)


def test_predict_slices_stacks_as_the_dataset_does(lgg_h5, tmp_path, monkeypatch):
    cfg = context_config(lgg_h5, tmp_path, context=1)
    path = list_cases(lgg_h5)[1]
    expected = torch.stack([s["image"] for s in every_slice(build_dataset(cfg.data, [path]), monkeypatch)])
    seen = []

    def recording_predictor(batch):  # remembers its inputs, answers "tumour" where the middle FLAIR is bright
        seen.append(batch.clone())
        return (batch[:, 3 + 1:3 + 2] > 0).float() * 20 - 10

    image = read_case(path, case_format(cfg.data)).image
    probs = predict_slices(recording_predictor, image, (16, 16), batch_size=4, context=1)
    assert [len(b) for b in seen] == [4, 2] and probs.shape == (1, 6, 24, 24)
    torch.testing.assert_close(torch.cat(seen), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pairs, message", [
    ({"data.slice_context": "1"}, r"must equal \(2 \* data.slice_context \+ 1\) \* data.channels = 3 \* 3 = 9"),
    ({"data.slice_context": "-1"}, "cannot be negative"),
    ({"data.slice_context": "1", "data.mode": "resize", "model.dims": "3"}, "data.mode slices"),
])
def test_check_ties_input_channels_to_the_slice_context(pairs, message):
    with pytest.raises(ValueError, match=message):
        check(build_config(pairs, preset="lgg2d"))
    check(build_config({"data.slice_context": "1", "model.in_channels": "9"}, preset="lgg2d"))


def test_a_2_5d_model_trains_validates_and_is_scored(lgg_h5, tmp_path):
    torch.manual_seed(0)
    run_dir = train_and_evaluate(context_config(lgg_h5, tmp_path, context=1, **{"train.name": "ctx"}))
    assert os.path.isfile(os.path.join(run_dir, "best.pt")) and os.path.isfile(os.path.join(run_dir, "summary.json"))
