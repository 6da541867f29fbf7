"""Command-line text to config values: `--section.key VALUE` pairs out of argv, each value typed
from the field it overrides (sizes and spacings from "64" or "64,64,48"), the presets (named sets
of overrides), and which keys a user set. config.py applies them. No torch here either.
"""
import json

SIZE_KEYS = {"image_size", "patch_size"}
SPACING_KEYS = {"spacing"}


def parse_size(text):
    """'64' -> (64, 64, 64); '64,64,48' or [64, 64, 48] -> (64, 64, 48)."""
    if isinstance(text, int):
        return (text,) * 3
    if isinstance(text, (list, tuple)):
        values = tuple(int(v) for v in text)
    else:
        values = tuple(int(v) for v in str(text).strip("[]() ").replace(" ", "").split(",") if v)
    if len(values) == 1:
        values *= 3
    if len(values) not in (2, 3) or min(values) <= 0:
        raise ValueError(f"size {text!r}: expected one positive int or three, comma-separated")
    return values


def parse_spacing(text):
    """'' or 0 -> () (native); '1.5' -> (1.5, 1.5, 1.5); '1,1,2' or [1, 1, 2] -> (1.0, 1.0, 2.0)."""
    if isinstance(text, (int, float)):
        values = (float(text),)
    elif isinstance(text, (list, tuple)):
        values = tuple(float(v) for v in text)
    else:
        values = tuple(float(v) for v in str(text).strip("[]() ").replace(" ", "").split(",") if v)
    if values in ((), (0.0,)):
        return ()
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"data.spacing {text!r}: expected one positive number (mm) or three, comma-separated; "
                         f"'' or 0 for the native spacing")
    return values


def parse_value(section, name, current, text):
    """Type a command-line string from the field it overrides."""
    if name in SIZE_KEYS:
        return parse_size(text)
    if name in SPACING_KEYS:
        return parse_spacing(text)
    if isinstance(current, bool):
        lowered = str(text).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{section}.{name}: expected true or false, got {text!r}")
    try:
        return type(current)(text)
    except ValueError:
        raise ValueError(f"--{section}.{name}: expected {type(current).__name__}, got {text!r}") from None


def split_args(argv):
    """Split argv into {'section.key': 'text'} pairs and the remaining arguments."""
    pairs, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=")[0]:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg}: missing value")
                value, i = argv[i + 1], i + 1
            pairs[key] = value
        else:
            rest.append(arg)
        i += 1
    return pairs, rest


# Presets: named override sets, applied before --config and command-line overrides.
PRESETS = {
    # Kaggle LGG (mateuszbuda/lgg-mri-segmentation) converted with `prepare_data.py lgg`: a 2D UNet on
    # 256x256 slices (3 channels: pre-contrast, FLAIR, post-contrast) with one sigmoid "tumour" map.
    # Native 256x256 as in the reference; on a CPU pass --data.image_size 128,128 (4x fewer pixels).
    # Augmentation as in the reference: flips, +-15 degree rotations, scaling within 5%; no quarter turns.
    "lgg2d": {"data.task": "binary", "data.mode": "slices", "data.channels": 3, "data.image_size": "256,256",
              "data.foreground_fraction": 0.5, "data.slices_per_case": 0, "data.cache_gb": 4.0,
              "data.rot90_prob": 0.0, "data.rotate_prob": 0.5, "data.max_rotate_deg": 15.0,
              "data.zoom_prob": 0.5, "data.max_zoom": 0.05,
              "model.dims": 2, "model.in_channels": 3, "model.out_channels": 1, "model.base_channels": 32,
              "model.depth": 4, "model.norm": "batch",
              "train.batch_size": 16, "train.lr": 3e-4, "train.epochs": 50, "train.patience": 10,
              "eval.batch_size": 16},
}


def get_key(cfg, key):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def flat_keys(overrides):
    """The 'section.key' names of an override dict ({'section.key': v} or {'section': {'key': v}})."""
    return [f"{key}.{name}" for key, value in overrides.items() if isinstance(value, dict) for name in value] + \
        [key for key, value in overrides.items() if not isinstance(value, dict)]


PRESET_LENGTH = ("train.epochs",)  # a preset's run length without a budget: a train.max_minutes plan sets it


def explicit_keys(cfg, pairs, preset=None, config_file=None):
    """{'section.key': value in cfg} of every key the user set: by the preset, the config file or the
    command line (the planner plans only the others). Under a budget (train.max_minutes) a preset's
    epoch limit is not the user's: it would end the run before the budget does, mid-schedule."""
    preset_keys = set(flat_keys(PRESETS.get(preset, {})))
    if cfg.train.max_minutes > 0:
        preset_keys -= set(PRESET_LENGTH)
    keys = set(pairs) | preset_keys
    if config_file:
        with open(config_file) as f:
            keys |= set(flat_keys(json.load(f)))
    return {key: get_key(cfg, key) for key in sorted(keys)}
