import json
import logging

import pytest

from config import Config, build_config, check, from_dict, to_dict
from overrides import parse_size, split_args


def test_overrides_are_typed_from_the_field():
    pairs, rest = split_args(["--train.lr", "3e-4", "--train.epochs=7", "--data.augment", "false",
                              "--data.image_size", "48,64,32", "--model.norm", "group", "--preset", "x"])
    cfg = build_config(pairs)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.data.augment is False
    assert cfg.data.image_size == (48, 64, 32)
    assert cfg.model.norm == "group"
    assert rest == ["--preset", "x"]


def test_one_int_size_means_a_cube():
    assert parse_size("32") == (32, 32, 32)
    assert build_config({"data.image_size": "40"}).data.image_size == (40, 40, 40)


@pytest.mark.parametrize("key, close", [("train.lrr", "train.lr"), ("trian.epochs", "train.epochs"),
                                        ("model.base_channel", "model.base_channels")])
def test_unknown_key_lists_close_matches(key, close):
    with pytest.raises(KeyError, match=close.replace(".", r"\.")):
        build_config({key: "1"})


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="train.epochs"):
        build_config({"train.epochs": "many"})
    with pytest.raises(ValueError, match="data.augment"):
        build_config({"data.augment": "maybe"})


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"epochs": 3, "lr": 0.01}, "data.dir": "somewhere"}))
    cfg = build_config({"train.epochs": "5"}, config_file=str(path))
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.dir) == (5, 0.01, "somewhere")


def test_round_trip_through_json():
    cfg = build_config({"data.image_size": "32,48,40", "train.batch_size": "4"})
    data = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(data) == cfg
    assert from_dict(to_dict(Config())) == Config()


def test_unknown_preset_is_an_error():
    with pytest.raises(KeyError, match="preset"):
        build_config({}, preset="nope")


def test_defaults_and_the_preset_pass_the_check():
    assert check(Config()) == Config()
    check(build_config({}, preset="lgg2d"))


# (overrides, words the error must say: the key to change and what it must fit)
BAD_COMBINATIONS = {
    "unknown mode": ({"data.mode": "tiles"}, "data.mode 'tiles': choose one of 'resize', 'patch', 'slices'"),
    "unknown task": ({"data.task": "lesions"}, "data.task 'lesions': choose one of 'brats', 'binary'"),
    "unknown split": ({"eval.split": "train"}, "eval.split 'train': choose one of"),
    "channel order": ({"data.channel_last": "yes"}, "data.channel_last 'yes'"),
    "2D model, 3D mode": ({"model.dims": "2"}, "model.dims 2 does not fit data.mode resize"),
    "3D model, slices": ({"data.mode": "slices"}, "model.dims 3 does not fit data.mode slices"),
    "outputs vs task": ({"data.task": "binary"}, "model.out_channels (3) must equal the 1 regions of data.task binary"),
    "inputs vs channels": ({"data.channels": "3"}, "model.in_channels (4) must equal data.channels (3)"),
    "2D patch": ({"data.mode": "patch", "data.patch_size": "64,64"}, "data.patch_size (64, 64): data.mode patch "
                                                                     "trains a 3D model; give three sizes"),
    "2D resize": ({"data.image_size": "48,48"}, "data.image_size (48, 48): data.mode resize trains a 3D model"),
    "patch vs depth": ({"data.mode": "patch", "data.patch_size": "60"}, "data.patch_size (60, 60, 60): every axis "
                                                                        "must be divisible by 2**model.depth = 8"),
    "slice vs depth": ({"data.image_size": "256,250"}, "data.image_size (256, 250): every axis must be divisible by "
                                                       "2**model.depth = 16"),
}


@pytest.mark.parametrize("kind", list(BAD_COMBINATIONS))
def test_check_names_the_key_to_change(kind):
    overrides, words = BAD_COMBINATIONS[kind]
    preset = "lgg2d" if kind == "slice vs depth" else None
    with pytest.raises(ValueError) as err:
        check(build_config(overrides, preset=preset))
    assert words in str(err.value)


def test_patch_mode_checks_the_patch_not_the_resize_target():
    check(build_config({"data.mode": "patch", "data.patch_size": "32", "data.image_size": "30"}))


def test_no_validation_cases_is_said_once_by_the_training_process(caplog):
    cfg = build_config({"data.val_fraction": "0"})
    with caplog.at_level(logging.WARNING):
        check(cfg)
        assert not caplog.records  # evaluation and the other ranks stay quiet
        check(cfg, warn=True)
    assert [r.getMessage() for r in caplog.records] == [
        "data.val_fraction is 0: no validation cases, so best.pt follows the training loss"]


def test_old_configs_with_every_key_still_load():
    saved = to_dict(Config())
    saved["eval"]["split"] = "val"
    assert check(from_dict(saved)).eval.split == "val"


def test_training_refuses_a_bad_combination_in_one_line_before_touching_data(tmp_path):
    import main
    with pytest.raises(SystemExit) as stop:
        main.main(["--data.dir", str(tmp_path / "nowhere"), "--model.in_channels", "3",
                   "--train.out_dir", str(tmp_path / "runs")])
    assert stop.value.code == "error: model.in_channels (3) must equal data.channels (4)"
    assert not (tmp_path / "runs").exists()


def test_spacing_is_native_when_empty_or_0_and_three_numbers_otherwise():
    assert build_config({}).data.spacing == () and build_config({"data.spacing": "0"}).data.spacing == ()
    assert build_config({"data.spacing": "1.5"}).data.spacing == (1.5, 1.5, 1.5)
    assert build_config({"data.spacing": "1,1,2"}).data.spacing == (1.0, 1.0, 2.0)
    assert from_dict(to_dict(build_config({"data.spacing": "2"}))).data.spacing == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="data.spacing"):
        build_config({"data.spacing": "1,2"})


@pytest.mark.parametrize("pairs, message", [
    ({"train.schedule": "step"}, "train.schedule"), ({"train.plan": "maybe"}, "train.plan"),
    ({"train.schedule": "poly"}, "train.max_steps > 0"), ({"train.val_every": "-1"}, "train.val_every"),
    ({"train.epochs": "0"}, "nothing would end training")])
def test_the_check_names_a_bad_schedule_or_training_length(pairs, message):
    with pytest.raises(ValueError, match=message):
        check(build_config(pairs))
    check(build_config({"train.schedule": "cosine", "train.max_steps": "10", "train.epochs": "0"}))


def test_explicit_keys_come_from_the_preset_the_config_file_and_the_command_line(tmp_path):
    from config import explicit_keys
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"lr": 0.01}, "data.spacing": 2}))
    pairs = {"model.base_channels": "8"}
    cfg = build_config(pairs, "lgg2d", str(path))
    explicit = explicit_keys(cfg, pairs, "lgg2d", str(path))
    assert explicit["train.lr"] == 0.01 and explicit["data.spacing"] == (2.0, 2.0, 2.0)
    assert explicit["model.base_channels"] == 8 and explicit["data.mode"] == "slices"  # the preset's
    assert "train.epochs" in explicit and "data.dir" not in explicit


def test_under_a_budget_a_presets_epoch_limit_is_left_to_the_plan(tmp_path):
    from config import explicit_keys
    pairs = {"train.max_minutes": "30"}
    cfg = build_config(pairs, "lgg2d")
    explicit = explicit_keys(cfg, pairs, "lgg2d")
    assert "train.epochs" not in explicit and explicit["model.dims"] == 2  # the rest of the preset stays
    pairs["train.epochs"] = "7"  # the user's own limit is kept
    assert explicit_keys(build_config(pairs, "lgg2d"), pairs, "lgg2d")["train.epochs"] == 7
