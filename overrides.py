"""Command-line text to config values: `--section.key VALUE` pairs out of argv, each value typed
from the field it overrides (sizes and spacings from "64" or "64,64,48"). config.py applies them
(and holds the presets). No torch here either.
"""
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
