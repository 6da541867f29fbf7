"""Every hyperparameter, and the rules that tie keys together.

- Config: the keys, as nested dataclasses (data, model, train, eval), each default commented.
- PRESETS: named sets of keys (`--preset lgg2d`).
- PLANNER: the constants train.max_minutes plans with (planning/); POSTSELECT: the postprocessing
  options tried on the validation cases (evaluation/postselect.py). Neither is a config key: they
  decide values of config keys, and this is the one place to change them.

Override any key as `--section.key VALUE` or `--section.key=VALUE`; values are typed from the
field (overrides.py). `--config FILE.json` is applied first, `--preset NAME` before that. Unknown keys are
errors that list the close matches. This module imports no torch, so every other module can use it.
"""
import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field

from overrides import SIZE_KEYS, SPACING_KEYS, parse_value

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
    test_fraction: float = 0.15        # share of cases (patients) held out for the final test: taken when the
                                       # user sets it, else only if it holds data.min_test_cases patients
    min_test_cases: int = 10           # a test split the user did not ask for needs this many patients: fewer
                                       # tell little and cost training cases (docs/training.md#what-is-held-out)
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
    missing_prob: float = 0.0          # probability that a training sample loses some of its sequences: each lost
                                       # one becomes a copy of data.fill_channel, as datasets fill a missing sequence
    fill_channel: int = -1             # the sequence a dataset fills missing ones with (Kaggle LGG: 1, FLAIR); -1: off
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
    ship: str = "auto"                 # the weights best.pt holds: "best" (the best validation round), "final"
                                       # (the last round's), "auto": final under poly/cosine, best under plateau


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
    enhancing_label: int = 4           # ET label in exported maps of cases with no known BraTS label convention
    save_probabilities: bool = False   # with --save-predictions, also write region probabilities (.npz)
    min_component_voxels: int = 0      # remove tumour components (face-connected, all their labels) below this
                                       # many voxels (0: off)
    unsure_component_voxels: int = 0   # remove a tumour component (26-connected, all its labels) only when it is
                                       # below this many voxels AND its peak probability is below
                                       # eval.unsure_component_peak: one the network is sure of is always kept (0: off)
    unsure_component_peak: float = 0.0  # ...the peak tumour probability (largest region probability) a component
                                        # must reach somewhere to count as confident (0: off)
    minor_component_share: float = 0.0  # remove every tumour component (26-connected, all its labels) whose
                                        # probability mass is below this share of the largest one's (0: off)
    choose_postprocessing: bool = True  # after training, choose the postprocessing keys on the validation
                                        # cases and store them in best.pt (evaluation/postselect.py)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)



# Presets: named override sets, applied before --config and command-line overrides.
PRESETS = {
    # Kaggle LGG (mateuszbuda/lgg-mri-segmentation) converted with `prepare_data.py lgg`: a 2D UNet on
    # 256x256 slices (3 channels: pre-contrast, FLAIR, post-contrast) with one sigmoid "tumour" map.
    # Native 256x256 and width 32 as in the reference: the recipe without a budget; with
    # train.max_minutes the planner chooses size, width, depth, batch, 2.5D context and lr from them.
    # Augmentation as in the reference: flips, +-15 degree rotations, scaling within 5%; no quarter turns;
    # and missing sequences filled with FLAIR, as the dataset fills them (docs/lgg.md measures it).
    "lgg2d": {"data.task": "binary", "data.mode": "slices", "data.channels": 3, "data.image_size": "256,256",
              "data.foreground_fraction": 0.5, "data.slices_per_case": 0, "data.cache_gb": 4.0,
              "data.rot90_prob": 0.0, "data.rotate_prob": 0.5, "data.max_rotate_deg": 15.0,
              "data.zoom_prob": 0.5, "data.max_zoom": 0.05, "data.missing_prob": 0.2, "data.fill_channel": 1,
              "model.dims": 2, "model.in_channels": 3, "model.out_channels": 1, "model.base_channels": 32,
              "model.depth": 4, "model.norm": "batch",
              "train.batch_size": 16, "train.lr": 3e-4, "train.epochs": 50, "train.patience": 10,
              "eval.batch_size": 16},
}
PRESET_LENGTH = ("train.epochs",)  # a preset's run length without a budget: a train.max_minutes plan sets it
# A preset's network, slice size, batch and learning rate: its recipe without a budget, the starting
# point a train.max_minutes plan may change (unless the command line or --config sets them)
PRESET_PLANNABLE = ("data.image_size", "data.slice_context", "model.base_channels", "model.depth",
                    "model.in_channels", "train.batch_size", "train.lr")

# --- The planner's defaults (planning/) -----------------------------------------------------------
# What train.max_minutes plans with: not config keys (the plan sets config keys from them), but the
# place to change one. docs/training.md says how they were set and measured.
@dataclass(frozen=True)
class PlannerDefaults:
    target_steps: int = 1000           # at each spacing the largest sample that buys this many optimizer steps
    min_steps: int = 400               # ...else the smallest sample if it buys this many; below, a coarser spacing
    spacing_factors: tuple = (1.0, 1.25, 1.5, 1.75, 2.0)  # candidate spacings, as multiples of the data's finest
                                       # native spacing; no axis is resampled finer than its own spacing
    voxel_cap: int = 128 ** 3          # largest sample (voxels per case): nnU-Net's BraTS patch at 1 mm; a whole
                                       # resampled case within it is served whole (resize mode)
    patch_ladder: tuple = (128 ** 3, 112 ** 3, 96 ** 3, 80 ** 3, 64 ** 3)  # patch sizes weighed at a spacing
                                       # (voxels, shaped like the case), largest first
    min_bottleneck: int = 4            # downsample until the bottleneck's smallest side is this many voxels...
    max_depth: int = 3                 # ...but at most this many times (a few hundred CPU steps train no deeper net)
    batch_size: int = 2                # as nnU-Net in 3D: under a budget a larger batch buys fewer steps
    val_share: float = 0.10            # validation may take at most this share of the budget (and, re-fitting
                                       # the steps during training, of the time left)
    max_validations: int = 20          # ...and happens at most this often: enough points for a curve
    val_sw_batch: int = 1              # patch mode: windows per forward in validation (eval.sw_batch_size's
                                       # choice on a CPU)
    warmup_share: float = 0.03         # linear learning-rate warm-up over this share of the planned steps
    speed_sides_cpu: tuple = (32, 48, 64)    # cube sides training's step is timed at on a CPU (largest first)
    speed_sides_cuda: tuple = (64, 96, 128)  # ...and on a GPU (rounded to multiples of 2**model.depth)
    speed_steps: int = 4               # training steps timed at each side, after untimed warm-up steps
    speed_seconds: float = 10.0        # no further side is timed once its timing would end past this many
                                       # seconds (the first, largest side always is): a busy device plans
                                       # from fewer
    # 2D slices (planning/slices.py); docs/lgg.md says what on the LGG patients set each
    slice_factors: tuple = (1.0, 0.75, 0.5)  # in-plane sizes weighed, as shares of the cases' median (H, W):
                                       # native down to half (LGG masks taken to half and back keep Dice 0.992)
    slice_widths: tuple = (16, 24, 32)  # model.base_channels weighed (32: the LGG reference's)
    slice_target_epochs: int = 100     # the costliest (size, width) whose steps make this many passes over the
                                       # training slices, as the LGG reference trains its 256x256 width-32 net
                                       # (100 epochs in batches of 16); else the cheapest
    slice_max_depth: int = 4           # downsamplings at most (on LGG depth 3 scored lower than 4)...
    slice_min_bottleneck: int = 8      # ...while the bottleneck keeps this many pixels a side
    slice_batch: int = 16              # slices a step: batch norm's statistics over 16 slices, as the LGG reference
    slice_context: int = 1             # neighbouring slices each side as channels (2.5D; as good as 2D on LGG)
    slice_lr: float = 1e-3             # Adam learning rate under poly (on LGG 3e-4 and 2e-3 scored lower)
    slice_width_exponent: float = 2.0  # a step's seconds ~ pixels x width**this when only one width was timed
    slice_speed_cases: int = 3         # training cases the 2D step is timed on (read once, served from memory)


PLANNER = PlannerDefaults()


# --- The postprocessing search's candidates (evaluation/postselect.py) -----------------------------
# The options tried after training on the validation cases: not config keys (the search sets the
# eval.* keys named here), but the place to change one. docs/training.md says how one is adopted.
@dataclass(frozen=True)
class PostprocessingCandidates:
    unsure_voxels: tuple = (10, 100, 1000, 10000)  # eval.unsure_component_voxels tried (voxels of the case's
                                       # grid; a 1 mm BraTS tumour has 10^4 - 10^5)
    unsure_peaks: tuple = (0.8, 0.95)  # eval.unsure_component_peak tried with each size: a component whose
                                       # probability never reaches it is unsure
    minor_shares: tuple = (0.01, 0.02, 0.05, 0.1, 0.2)  # eval.minor_component_share tried: the confident false
                                       # positives far from the tumour are 1-15% of its mass on real cases
    et_sizes: tuple = (50, 200, 500, 1000)  # eval.postprocess_et_min tried (voxels; BraTS winners relabel ET
                                       # below ~500 at 1 mm)


POSTSELECT = PostprocessingCandidates()

SCHEDULES = ("plateau", "poly", "cosine")
PLAN_CHOICES = ("auto", "off")
SHIP_CHOICES = ("auto", "best", "final")


def ships_final_weights(train_cfg):
    """Whether best.pt holds the final weights: a poly or cosine schedule ends its learning rate with the
    run, so its last weights are the model, as nnU-Net ships its final checkpoint; a round picked on
    one or two validation cases would be picked by noise."""
    return train_cfg.ship == "final" or (train_cfg.ship == "auto" and train_cfg.schedule != "plateau")


def all_keys(cfg):
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def get_key(cfg, key):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


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


def flat_keys(overrides):
    """The 'section.key' names of an override dict ({'section.key': v} or {'section': {'key': v}})."""
    return [f"{key}.{name}" for key, value in overrides.items() if isinstance(value, dict) for name in value] + \
        [key for key, value in overrides.items() if not isinstance(value, dict)]


def explicit_keys(cfg, pairs, preset=None, config_file=None):
    """{'section.key': value in cfg} of every key the user set: by the preset, the config file or the
    command line (the planner plans only the others). Under a budget (train.max_minutes) a preset's
    epoch limit is not the user's: it would end the run before the budget does, mid-schedule; nor
    are its network, size, batch and learning rate (PRESET_PLANNABLE): the plan starts from them."""
    preset_keys = set(flat_keys(PRESETS.get(preset, {})))
    if cfg.train.max_minutes > 0:
        preset_keys -= set(PRESET_LENGTH) | set(PRESET_PLANNABLE)
    keys = set(pairs) | preset_keys
    if config_file:
        with open(config_file) as f:
            keys |= set(flat_keys(json.load(f)))
    return {key: get_key(cfg, key) for key in sorted(keys)}


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
               ("train.plan", cfg.train.plan, PLAN_CHOICES), ("train.ship", cfg.train.ship, SHIP_CHOICES)]
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
    check_fill_channel(data)
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


def check_fill_channel(data):
    """data.missing_prob needs a data.fill_channel among the data.channels sequences."""
    if data.missing_prob > 0 and not 0 <= data.fill_channel < data.channels:
        raise ValueError(f"data.missing_prob {data.missing_prob} needs data.fill_channel, the sequence that fills a "
                         f"missing one: 0..{data.channels - 1} (it is {data.fill_channel})")


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
