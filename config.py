"""Every hyperparameter, as nested dataclasses, the presets, and the rules that tie keys together.

Override any key as `--section.key VALUE` or `--section.key=VALUE`; values are typed from the
field (overrides.py). `--config FILE.json` is applied first, `--preset NAME` before that. Unknown keys are
errors that list the close matches. This module imports no torch, so every other module can use it.
"""
import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field

from overrides import PRESETS, SIZE_KEYS, SPACING_KEYS, parse_value

log = logging.getLogger(__name__)

# The regions (sigmoid output channels) of each data.task, each a set of mask labels: "brats" scores
# BraTS 2018-21 labels (1 NCR, 2 ED, 4 ET) as WT/TC/ET; "binary" is a 0/1 mask (Kaggle LGG).
TASK_REGIONS = {"brats": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}, "binary": {"tumour": (1,)}}
MODE_DIMS = {"resize": 3, "patch": 3, "slices": 2}  # the model.dims each data.mode trains
EVAL_SPLITS = ("test", "val", "all")


@dataclass
class DataConfig:
    dir: str = "data/synthetic"        # folder of .h5 cases; if it holds none, a synthetic set is generated there
    synthetic_cases: int = 48          # cases generated when data.dir is empty
    task: str = "brats"                # "brats": 3 sigmoid maps WT/TC/ET from labels 1/2/4;
                                       # "binary": one map "tumour" from label 1 (masks 0/1, e.g. Kaggle LGG)
    mode: str = "resize"               # "resize": whole volume resized to image_size; "patch": random patches;
                                       # "slices": 2D axial slices of each case (needs model.dims 2)
    image_size: tuple = (48, 48, 48)   # resize target (D, H, W); one int means a cube; slices mode uses the last two
    patch_size: tuple = (64, 64, 64)   # patch mode: patch size (D, H, W); one int means a cube
    foreground_fraction: float = 0.33  # patch mode: share of patches centred on tumour; slices mode: share of
                                       # sampled slices that hold tumour (the rest are tumour-free slices)
    slices_per_case: int = 0           # slices mode: slices sampled from each training case per epoch
                                       # (0: as many as the case has)
    patches_per_case: int = 1          # patch mode: patches drawn from each training case per epoch
    channels: int = 4                  # image channels (FLAIR, T1, T1ce, T2)
    image_key: str = "image"           # .h5 dataset holding the image (e.g. "raw")
    mask_key: str = "mask"             # .h5 dataset holding the mask (e.g. "label")
    channel_last: str = "auto"         # image axis order: "auto" detects, "true" (D,H,W,C), "false" (C,D,H,W)
    label_map: str = ""                # label renaming before use, e.g. "3:4" for BraTS 2023+ labels
    val_fraction: float = 0.15         # share of cases (patients) held out for validation
    test_fraction: float = 0.15        # share of cases (patients) held out for the final test
    split_seed: int = 0                # seed of the per-case split (saved as split.json in the run)
    num_workers: int = -1              # DataLoader workers; -1: 0 on CPU (workers would steal the cores
                                       # the step needs), min(4, cores) on CUDA
    cache_gb: float = 2.0              # memory for cached cases: the training set (resized, or resampled to a coarser
                                       # data.spacing) and, separately, the raw validation cases; each up to this size
    augment: bool = True               # training augmentation on/off
    flip_prob: float = 0.5             # probability of a flip, per axis
    rot90_prob: float = 0.5            # probability of a random 90-degree turn in the axial plane
    rotate_prob: float = 0.2           # probability of a small-angle rotation
    max_rotate_deg: float = 15.0       # small-angle rotation range, +- degrees about each axis
    zoom_prob: float = 0.0             # probability of a random zoom (spatial scaling) about the centre
    max_zoom: float = 0.15             # zoom factor drawn from [1 - max_zoom, 1 + max_zoom]
    intensity_prob: float = 0.15       # probability of a random per-channel intensity scale and shift
    intensity_scale: float = 0.1       # scale drawn from [1 - intensity_scale, 1 + intensity_scale]
    intensity_shift: float = 0.1       # shift drawn from [-intensity_shift, intensity_shift] (z-score units)
    gamma_prob: float = 0.15           # probability of a random gamma on each channel's min-max range
    max_gamma: float = 1.5             # gamma drawn log-uniformly from [1 / max_gamma, max_gamma]
    noise_prob: float = 0.1            # probability of additive Gaussian noise
    noise_std: float = 0.1             # noise std drawn from [0, noise_std] (z-score units)
    folds: int = 0                     # cross-validation: deal the non-test patients into this many folds (0: off)
    fold: str = "all"                  # with data.folds K: the fold validated on, "0".."K-1", or "all" to train
                                       # every fold in turn into RUN/fold_<i> (see docs/evaluation.md)
    spacing: tuple = ()                # target spacing in mm (D, H, W; one number means all axes), never finer
                                       # than a case's own; patch mode resamples to it; "" or 0: native
    slice_context: int = 0             # slices mode: k neighbouring slices on each side as extra input channels
                                       # (2.5D; model.in_channels = (2k+1) * channels; edges repeat the edge slice)


@dataclass
class ModelConfig:
    dims: int = 3                      # 3 for volumes, 2 for slices
    in_channels: int = 4               # input channels (must equal data.channels)
    out_channels: int = 3              # output channels, one sigmoid map per region of data.task (brats 3, binary 1)
    base_channels: int = 16            # width of the first stage; doubles each stage
    max_channels: int = 320            # cap on a stage's width (as in nnU-Net)
    depth: int = 3                     # number of downsamplings; inputs must be divisible by 2**depth
    norm: str = "instance"             # "instance" | "batch" | "group"
    checkpointing: bool = False        # gradient checkpointing per stage: less memory, a slower step


@dataclass
class TrainConfig:
    epochs: int = 30                   # maximum epochs (0: no limit; train.max_steps or train.max_minutes end it)
    batch_size: int = 2                # samples per step
    lr: float = 1e-3                   # Adam learning rate
    weight_decay: float = 0.0          # Adam weight decay
    dice_weight: float = 1.0           # weight of soft Dice in the loss
    bce_weight: float = 1.0            # weight of BCE-with-logits in the loss
    grad_clip: float = 12.0            # max gradient norm (0 disables clipping)
    lr_patience: int = 3               # ReduceLROnPlateau: epochs without val-loss improvement before cutting lr
    lr_factor: float = 0.5             # ReduceLROnPlateau: lr multiplier
    patience: int = 10                 # early stopping: epochs without val-Dice improvement
    max_minutes: float = 0.0           # stop after this many minutes of training (0: no limit)
    amp: bool = True                   # mixed precision as train.precision says; false: fp32 everywhere
    precision: str = "auto"            # "auto": bf16 on GPUs (fp16 on older ones) and on CPUs with native bf16, else fp32 | "bf16" | "fp16" | "fp32"
    channels_last: bool = True         # channels-last memory layout for convolutions (faster, same results)
    compile: bool = False              # torch.compile the model (slow first step; see docs/performance.md)
    device: str = "auto"               # "auto" (CUDA when available), "cuda" or "cpu"
    seed: int = 0                      # seed for weights, sampling and augmentation
    out_dir: str = "runs"              # runs are written to out_dir/name
    name: str = ""                     # run folder name; empty: a timestamp
    overwrite: bool = False            # allow writing into an existing, non-empty run folder
    resume: str = ""                   # checkpoint or run folder to continue from (same as --resume RUN_DIR)
    deterministic: bool = False        # seed everything and use deterministic algorithms (slower on GPU)
    max_bad_steps: int = 20            # stop after this many consecutive NaN/Inf steps (0: never)
    scale_lr: bool = False             # under torchrun with N processes: lr x N (linear scaling rule for the
                                       # N-times larger global batch); no effect in a single process
    sync_batchnorm: bool = True        # under torchrun with model.norm batch: SyncBatchNorm, statistics over
                                       # the global batch (instance/group norm need nothing)
    schedule: str = "plateau"          # "plateau": ReduceLROnPlateau + early stopping | "poly" | "cosine": a pure
                                       # function of the step, decaying to 0 at train.max_steps
    warmup_steps: int = 0              # poly/cosine: linear learning-rate warm-up over this many steps
    max_steps: int = 0                 # stop after this many optimizer steps (0: no limit)
    val_every: int = 0                 # validate every this many optimizer steps (0: once per epoch)
    batch_dice: bool = False           # soft Dice summed over the batch too (nnU-Net's choice for BraTS regions)
    plan: str = "auto"                 # "auto": plan the recipe from the data when train.max_minutes > 0 | "off"


@dataclass
class EvalConfig:
    split: str = "test"                # evaluate.py's default --split: "test" | "val" | "all"
    threshold: float = 0.5             # sigmoid threshold for each region
    batch_size: int = 1                # cases (slices mode: slices) per forward pass in validation and prediction
    overlap: float = 0.5               # patch mode: sliding-window overlap, as a share of the window
    sw_batch_size: int = 0             # patch mode: windows per forward pass (bounds the memory used);
                                       # 0: 1 on a CPU (faster per window there), 2 on a GPU
    crop_nonzero: bool = True          # patch mode: predict only the box of non-zero voxels; outside it
                                       # is background (nnU-Net's crop; a whole scan has ~2.5x the windows)
    gaussian: bool = True              # patch mode: weight windows by a Gaussian (centres count more)
    mirror: bool = False               # test-time augmentation: average over every axis flip (8x slower in 3D)
    postprocess_et_min: int = 0        # brats task: predicted ET below this many voxels becomes necrosis (0: off)
    largest_component: bool = False    # keep only the largest connected (3D) component of the predicted
                                       # tumour, with its labels, as mateuszbuda's LGG reference does
    enhancing_label: int = 4           # label written for enhancing tumour in exported maps (3 for BraTS 2023+)
    save_probabilities: bool = False   # with --save-predictions, also write region probabilities (.npz)
    min_component_voxels: int = 0      # remove tumour components (face-connected, all their labels) below this
                                       # many voxels (0: off)
    choose_postprocessing: bool = True  # after training, choose the postprocessing keys on the validation
                                        # cases and store them in best.pt (postselect.py)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)



SCHEDULES = ("plateau", "poly", "cosine")
PLAN_CHOICES = ("auto", "off")


def all_keys(cfg):
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def set_key(cfg, key, value, from_text=True):
    """Set 'section.name' on cfg; an unknown key raises KeyError listing the close matches."""
    section, _, name = key.partition(".")
    part = getattr(cfg, section, None)
    if part is None or not dataclasses.is_dataclass(part) or name not in {f.name for f in dataclasses.fields(part)}:
        close = difflib.get_close_matches(key, all_keys(cfg), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        raise KeyError(f"unknown config key --{key}{hint}")
    current = getattr(part, name)
    if from_text or name in SIZE_KEYS or name in SPACING_KEYS:
        value = parse_value(section, name, current, value)
    setattr(part, name, value)


def apply_dict(cfg, overrides):
    """Apply {'section.key': value} or {'section': {'key': value}} (as in config.json)."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            for name, inner in value.items():
                set_key(cfg, f"{key}.{name}", inner, from_text=False)
        else:
            set_key(cfg, key, value, from_text=isinstance(value, str))
    return cfg


def build_config(pairs, preset=None, config_file=None, base=None):
    """Defaults (or base), then preset, then config file, then command-line pairs."""
    cfg = base or Config()
    if preset:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        apply_dict(cfg, PRESETS[preset])
    if config_file:
        with open(config_file) as f:
            apply_dict(cfg, json.load(f))
    for key, value in pairs.items():
        set_key(cfg, key, value)
    return cfg


def to_dict(cfg):
    """Plain nested dict (lists, not tuples), as written to config.json and into checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data):
    return apply_dict(Config(), data)


# Keys a resumed run may change: they alter when or where training runs, not what it computes.
RESUME_SAFE_KEYS = {"data.cache_gb", "data.dir", "data.num_workers", "data.synthetic_cases",
                    "eval.batch_size", "eval.split", "model.checkpointing", "train.device", "train.epochs",
                    "train.max_bad_steps", "train.max_minutes", "train.name", "train.out_dir",
                    "train.overwrite", "train.patience", "train.resume"}


def diff_keys(a, b):
    """Keys ('section.name') whose values differ between two configs."""
    flat_a, flat_b = to_dict(a), to_dict(b)
    return sorted(f"{section}.{name}" for section in flat_a for name in flat_a[section]
                  if flat_a[section][name] != flat_b[section].get(name))


def check(cfg, warn=False):
    """Validate the rules that tie keys together, once, so the code that dispatches on them can trust
    them; a ValueError says which key to change. `warn`: also log, once (the main process of a
    training run), what the config makes training do differently."""
    data, model = cfg.data, cfg.model
    choices = [("data.mode", data.mode, MODE_DIMS), ("data.task", data.task, TASK_REGIONS),
               ("data.channel_last", data.channel_last, ("auto", "true", "false")),
               ("eval.split", cfg.eval.split, EVAL_SPLITS), ("train.schedule", cfg.train.schedule, SCHEDULES),
               ("train.plan", cfg.train.plan, PLAN_CHOICES)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{key} {value!r}: choose one of {', '.join(map(repr, allowed))}")
    if model.dims != MODE_DIMS[data.mode]:
        raise ValueError(f"model.dims {model.dims} does not fit data.mode {data.mode}: 2D models train on "
                         f"data.mode slices, 3D models on resize or patch")
    regions = TASK_REGIONS[data.task]
    if model.out_channels != len(regions):
        raise ValueError(f"model.out_channels ({model.out_channels}) must equal the {len(regions)} regions of "
                         f"data.task {data.task} ({', '.join(regions)})")
    check_input_channels(data, model)
    check_input_size(cfg)
    check_folds(data)
    check_training_length(cfg.train)
    if warn and data.val_fraction == 0:
        log.warning("data.val_fraction is 0: no validation cases, so best.pt follows the training loss")
    return cfg


def check_folds(data):
    """data.folds is 0 or at least 2; data.fold names one of them or "all"."""
    if data.folds == 1 or data.folds < 0:
        raise ValueError(f"data.folds {data.folds}: use 0 (no cross-validation) or at least 2 folds")
    if data.folds and data.fold != "all" and data.fold not in {str(i) for i in range(data.folds)}:
        raise ValueError(f"data.fold {data.fold!r}: choose 0..{data.folds - 1} or all (data.folds is {data.folds})")


def check_input_channels(data, model):
    """model.in_channels is data.channels, times 2 * data.slice_context + 1 in slices mode (2.5D)."""
    if data.slice_context < 0 or (data.slice_context and data.mode != "slices"):
        raise ValueError(f"data.slice_context {data.slice_context}: neighbouring slices are for data.mode slices "
                         f"and cannot be negative; use 0")
    stacked = 2 * data.slice_context + 1
    if stacked == 1 and model.in_channels != data.channels:
        raise ValueError(f"model.in_channels ({model.in_channels}) must equal data.channels ({data.channels})")
    if model.in_channels != data.channels * stacked:
        raise ValueError(f"model.in_channels ({model.in_channels}) must equal (2 * data.slice_context + 1) * "
                         f"data.channels = {stacked} * {data.channels} = {stacked * data.channels}")


def check_input_size(cfg):
    """The size the model trains on (data.image_size, data.patch_size in patch mode, the last two axes
    of data.image_size in slices mode) has model.dims axes, each divisible by 2**model.depth."""
    key = "patch_size" if cfg.data.mode == "patch" else "image_size"
    size, step = tuple(getattr(cfg.data, key)), 2 ** cfg.model.depth
    if len(size) < cfg.model.dims:
        raise ValueError(f"data.{key} {size}: data.mode {cfg.data.mode} trains a 3D model; give three sizes (D,H,W)")
    if any(s % step for s in size[-cfg.model.dims:]):
        raise ValueError(f"data.{key} {size}: every axis must be divisible by 2**model.depth = {step}; "
                         f"change the size or model.depth")


def check_training_length(tc):
    """Something ends training, and a decaying schedule knows over how many steps it decays."""
    for key in ("epochs", "warmup_steps", "max_steps", "val_every"):
        if getattr(tc, key) < 0:
            raise ValueError(f"train.{key} {getattr(tc, key)}: must be 0 or more")
    if tc.schedule != "plateau" and tc.max_steps <= 0:
        raise ValueError(f"train.schedule {tc.schedule} decays the learning rate to 0 at train.max_steps; "
                         f"set train.max_steps > 0 (or train.max_minutes, which plans it)")
    if not (tc.epochs or tc.max_steps or tc.max_minutes):
        raise ValueError("train.epochs, train.max_steps and train.max_minutes are all 0: nothing would end "
                         "training; set one of them")
