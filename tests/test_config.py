import json

import pytest

from config import Config, build_config, from_dict, parse_size, split_args, to_dict


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

