"""Plan the training recipe from the data and the time budget.

plan_recipe(fp, budget_minutes, speed, explicit) is a pure function of planning.fingerprint (what
the training cases look like) and planning.speed.measure_speed (seconds a training step takes on
the device, its data loading included): the config values to train with, each with the reason it
was chosen. planning.report shows it and writes plan.json.

The rule, in order; the figures are config.PLANNER's. Candidate spacings run from the data's
native spacing to twice it. At each, the samples are the whole brain-cropped median case
resampled there ("resize") when it fits voxel_cap, and smaller patches of patch_ladder's sizes
with the case's aspect ratio ("patch"), largest first. Spacings are weighed finest first; at each,
the plan takes the largest sample for which the budget buys target_steps optimizer steps after
validation takes its share, else the smallest sample if it still buys min_steps, else it moves to
the next spacing (the coarsest's smallest sample when none does). The steps a candidate buys never
fall as the budget grows, so a smaller budget never gives a finer spacing. The network is the
configured one (the width the speed table timed); its depth follows the sample. The learning rate
follows a poly schedule over the planned steps with a short warm-up, so it reaches its end when
the budget ends. A key given explicitly is taken as given and the rest is planned around it.
Why these figures, and what they were measured against: docs/training.md. 2D slices (data.mode
slices) are planned by planning.slices.
"""
import dataclasses
import math

from config import PLANNER, DataConfig, EvalConfig
from planning.slices import plan_slices, slice_constants
from planning.speed import fit_speed, seconds_at
from transforms.resample import resampled_shape


def _three(value):
    """An explicit size or spacing (one number or three) as a list of 3."""
    if isinstance(value, (int, float)):
        return [value] * 3
    values = list(value)
    return values * 3 if len(values) == 1 else values


def plan_depth(min_side, explicit):
    """Downsamplings until the bottleneck's smallest side would drop under min_bottleneck voxels."""
    if "model.depth" in explicit:
        return int(explicit["model.depth"])
    depth = 1
    while depth < PLANNER.max_depth and min_side / 2 ** (depth + 1) >= PLANNER.min_bottleneck:
        depth += 1
    return depth


def candidate_spacings(fp, explicit):
    """Target spacings (mm, D/H/W) to weigh, finest first; never finer than the native spacing."""
    native = fp["median_spacing"]
    if "data.spacing" in explicit:  # () or 0: the native spacing
        return [[float(s) for s in _three(explicit["data.spacing"] or native)]]
    if "data.image_size" in explicit and explicit.get("data.mode", "resize") == "resize":
        size = _three(explicit["data.image_size"])  # the whole case resized to it: the spacing follows
        return [[round(n * s / i, 4) for n, s, i in zip(fp["median_shape"], native, size)]]
    spacings = []
    for factor in PLANNER.spacing_factors:
        spacing = [round(max(s, factor * min(native)), 4) for s in native]
        if spacing not in spacings:
            spacings.append(spacing)
    return spacings


def plan_samples(shape, explicit):
    """The (mode, size, depth) samples to weigh for a resampled median case of `shape`, largest
    first: the whole case when it fits voxel_cap (only it when data.mode resize says so), then
    patches of patch_ladder's voxel counts smaller than it, with the case's proportions, each no
    larger than the padded case."""
    mode = explicit.get("data.mode") or ("patch" if "data.patch_size" in explicit else None)
    if "data.image_size" in explicit and mode != "patch":
        size = [int(s) for s in _three(explicit["data.image_size"])]
        return [("resize", size, plan_depth(min(size), explicit))]
    samples = []
    if mode != "patch":
        depth = plan_depth(min(shape), explicit)
        whole = [max(2 ** depth, 2 ** depth * round(n / 2 ** depth)) for n in shape]
        if mode == "resize":
            return [("resize", whole, depth)]
        if math.prod(whole) <= PLANNER.voxel_cap:
            samples.append(("resize", whole, depth))
    if "data.patch_size" in explicit:
        patch = [int(s) for s in _three(explicit["data.patch_size"])]
        return [("patch", patch, plan_depth(min(patch), explicit))]
    for voxels in PLANNER.patch_ladder:
        if samples and voxels >= math.prod(samples[0][1]):
            continue  # no patch as large as the whole case it is cut from
        scale = min(1.0, (voxels / math.prod(shape)) ** (1 / 3))
        depth = plan_depth(min(shape) * scale, explicit)
        step = 2 ** depth
        patch = [max(step, step * math.floor(n * scale / step)) for n in shape]
        patch = [min(p, padded) for p, padded in zip(patch, padded_shape(shape, depth))]
        if ("patch", patch, depth) not in samples:
            samples.append(("patch", patch, depth))
    return samples


def padded_shape(shape, depth):
    """A shape padded up to multiples of 2**depth: the largest patch the median case offers."""
    return [2 ** depth * math.ceil(n / 2 ** depth) for n in shape]


def validation_seconds(mode, size, shape, forward):
    """Forward time of validating one median case: the whole resized case, or sliding windows at
    eval.overlap's default."""
    if mode == "resize":
        return seconds_at(forward, math.prod(size))
    strides = [max(1, int(p * (1 - EvalConfig.overlap))) for p in size]
    windows = math.prod(1 if n <= p else math.ceil((n - p) / s) + 1 for n, p, s in zip(shape, size, strides))
    return math.ceil(windows / PLANNER.val_sw_batch) * seconds_at(forward, PLANNER.val_sw_batch * math.prod(size))


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every candidate is weighed against: seconds, validation cases, batch and the fitted speed."""
    seconds: float
    val_cases: int
    batch: int
    fit: dict            # planning.speed.fit_speed of the speed table
    base_channels: int   # the width the speed table timed


def evaluate_candidate(spacing, shape, sample, budget):
    """Steps and validations one (spacing, sample) buys within the budget."""
    mode, size, depth = sample
    step_s = seconds_at(budget.fit["step"], budget.batch * math.prod(size))
    val_s = budget.val_cases * validation_seconds(mode, size, shape, budget.fit["forward"])
    # validation's share of the budget, at least one validation, at most max_validations: it never
    # shrinks as the budget grows, so neither do the steps (what keeps the spacing rule monotone)
    reserved = min(max(PLANNER.val_share * budget.seconds, val_s), PLANNER.max_validations * val_s)
    validations = max(1, min(PLANNER.max_validations, int(reserved // val_s))) if val_s > 0 else 1
    steps = int(max(0.0, budget.seconds - reserved) // step_s)
    return {"spacing": spacing, "shape": list(shape), "mode": mode, "size": size, "depth": depth,
            "base_channels": budget.base_channels, "batch_size": budget.batch, "step_seconds": step_s,
            "validation_seconds": val_s, "validations": validations, "steps": steps,
            "fits": mode == "resize" or all(p <= q for p, q in zip(size, padded_shape(shape, depth)))}


def choose_candidate(fp, budget, explicit):
    """The candidate the rule picks, and every candidate weighed, finest spacing first, for the record."""
    by_spacing = []
    for spacing in candidate_spacings(fp, explicit):
        shape = resampled_shape(fp["median_shape"], fp["median_spacing"], spacing)
        by_spacing.append([evaluate_candidate(spacing, shape, sample, budget)
                           for sample in plan_samples(shape, explicit)])
    weighed = [c for samples in by_spacing for c in samples]
    # an explicit patch larger than the median case at every spacing: the user's choice, at native spacing
    chosen = pick_sample(by_spacing) if any(c["fits"] for c in weighed) else weighed[0]
    return chosen, weighed


def pick_sample(by_spacing):
    """The rule of the module docstring over candidates grouped by spacing (finest first, each
    group largest sample first; at least one fits). A larger budget buys more steps for every
    candidate, so it can only stop at the same spacing or a finer one, never a coarser one."""
    for samples in by_spacing:
        fitting = [c for c in samples if c["fits"]]
        enough = [c for c in fitting if c["steps"] >= PLANNER.target_steps]
        if enough:
            return enough[0]
        if fitting and fitting[-1]["steps"] >= PLANNER.min_steps:
            return fitting[-1]
    return [c for samples in by_spacing for c in samples if c["fits"]][-1]  # the coarsest: less never buys finer


def _mm(spacing):
    return "x".join(f"{s:g}" for s in spacing) + " mm"


def _vox(size):
    return "x".join(str(int(s)) for s in size)


def mode_reason(c, explicit):
    if "data.mode" not in explicit and ("data.patch_size" in explicit or "data.image_size" in explicit):
        return f"implied by the explicit data.{'image' if c['mode'] == 'resize' else 'patch'}_size"
    whole = math.prod(c["size"]) if c["mode"] == "resize" else math.prod(c["shape"])
    return (f"whole median case at {_mm(c['spacing'])} is {_vox(c['shape'])}, {whole / 1e6:.2f} M voxels "
            f"{'<=' if c['mode'] == 'resize' else '>'} cap {PLANNER.voxel_cap / 1e6:.2f} M")


def spacing_reason(c, weighed, budget_minutes):
    """Why the chosen spacing: the rule's branch that picked it, with the steps it buys."""
    index = next((i for i, w in enumerate(weighed) if (w["spacing"], w["size"]) == (c["spacing"], c["size"])), 0)
    before = (f"; {weighed[index - 1]['steps']} with {_vox(weighed[index - 1]['size'])} at "
              f"{_mm(weighed[index - 1]['spacing'])}" if index else "")
    if c["steps"] >= PLANNER.target_steps:
        return (f"finest spacing, then largest sample, for which {budget_minutes:g} min buys >= "
                f"{PLANNER.target_steps} steps ({c['steps']}{before})")
    if c["steps"] >= PLANNER.min_steps:
        return (f"finest spacing at which the smallest sample still buys >= {PLANNER.min_steps} steps in "
                f"{budget_minutes:g} min ({c['steps']}; none buys {PLANNER.target_steps} there)")
    return f"no candidate buys {PLANNER.min_steps} steps in {budget_minutes:g} min; the coarsest"


def size_reason(c, fp):
    how = ("rounded to multiples of 2**depth" if c["mode"] == "resize" else
           "the largest of the patch ladder that buys the steps, the case's aspect ratio, within the padded "
           f"shape {_vox(padded_shape(c['shape'], c['depth']))}")
    return f"median brain-cropped case {_vox(fp['median_shape'])} at {_mm(fp['median_spacing'])} -> " \
           f"{_vox(c['shape'])}; {how}"


def explain(c, *, weighed, fp, budget_minutes, steps, val_every, explicit, speed):
    """A short reason for each planned key."""
    return {
        "data.mode": mode_reason(c, explicit),
        "data.spacing": spacing_reason(c, weighed, budget_minutes),
        "data.image_size" if c["mode"] == "resize" else "data.patch_size": size_reason(c, fp),
        "train.batch_size": f"{PLANNER.batch_size} as nnU-Net in 3D: a larger batch buys fewer steps under a budget",
        "model.depth": (f"downsample while the bottleneck keeps >= {PLANNER.min_bottleneck} voxels a side (at most "
                        f"{PLANNER.max_depth}; speed timed at depth {speed.get('depth', '?')})"),
        "train.schedule": "poly over the planned steps, so the learning rate ends when the budget does",
        "train.warmup_steps": f"linear warm-up over {PLANNER.warmup_share:.0%} of the steps",
        "train.max_steps": (f"{budget_minutes:g} min less {c['validations']} validation(s), at "
                            f"{c['step_seconds']:.3f} s a step of {c['batch_size']} x {_vox(c['size'])} "
                            f"(training's step timed with its data loading)"),
        "train.val_every": (f"{c['validations']} validation(s) of ~{c['validation_seconds']:.1f} s each "
                            f"(<= {PLANNER.val_share:.0%} of the budget, <= {PLANNER.max_validations}): every "
                            f"{val_every} of {steps} steps"),
        "train.epochs": "no epoch limit: train.max_steps and train.max_minutes end the run",
        "train.batch_dice": "Dice over the batch (nnU-Net for BraTS regions): ET-free patches still add gradient",
    }


def planner_constants():
    """The figures a plan used, as plan.json records them."""
    return {"TARGET_STEPS": PLANNER.target_steps, "MIN_STEPS": PLANNER.min_steps,
            "SPACING_FACTORS": list(PLANNER.spacing_factors), "VOXEL_CAP": PLANNER.voxel_cap,
            "MIN_BOTTLENECK": PLANNER.min_bottleneck, "MAX_DEPTH": PLANNER.max_depth,
            "BATCH_SIZE": PLANNER.batch_size, "VAL_SHARE": PLANNER.val_share,
            "MAX_VALIDATIONS": PLANNER.max_validations, "WARMUP_SHARE": PLANNER.warmup_share}


def plan_recipe(fp, budget_minutes, speed, explicit=None, val_cases=None):
    """The training recipe for a fingerprint, a budget (minutes; 0: none) and a speed table, as
    {"values": {config key: value}, "why": {config key: reason}, "estimates", "inputs", "constants",
    "steps": {"planned", "made": None until training has run}}.
    Pure: the same inputs give the same plan. A key in `explicit` ({config key: value}) is taken
    as given and the rest planned around it. No budget plans nothing: the plain defaults stay
    (ReduceLROnPlateau, early stopping). val_cases: validation cases (default data.val_fraction's
    default share of the cases)."""
    explicit = dict(explicit or {})
    val_cases = val_cases or max(1, round(DataConfig.val_fraction * fp["n_cases"]))
    inputs = {"budget_minutes": budget_minutes, "explicit": explicit, "val_cases": val_cases,
              "speed": speed, "fingerprint": fp}
    plan = {"values": {}, "why": {}, "estimates": {}, "inputs": inputs, "constants": planner_constants()}
    if not budget_minutes or budget_minutes <= 0:
        plan["why"]["plan"] = "no train.max_minutes: the plain defaults (ReduceLROnPlateau, early stopping)"
        return plan
    plan_for = plan_slices if explicit.get("data.mode") == "slices" or int(explicit.get("model.dims", 3)) == 2 \
        else plan_volumes
    values, why, plan["estimates"] = plan_for(fp, budget_minutes, speed, explicit=explicit, val_cases=val_cases)
    if plan_for is plan_slices:
        plan["constants"] = slice_constants()
    for key in values:
        if key in explicit:
            values[key], why[key] = explicit[key], explicit_reason(key, explicit[key])
    plan["values"], plan["why"] = values, why
    plan["steps"] = {"planned": int(values["train.max_steps"]), "made": None}
    return plan


def plan_volumes(fp, budget_minutes, speed, *, explicit, val_cases):
    """3D: spacing, sample, depth and schedule by the rule of the module docstring."""
    fit = fit_speed(speed)
    budget = Budget(60.0 * budget_minutes, val_cases, int(explicit.get("train.batch_size", PLANNER.batch_size)),
                    fit, int(speed.get("base_channels", speed["points"][0]["base_channels"])))
    chosen, weighed = choose_candidate(fp, budget, explicit)
    steps = max(1, int(explicit.get("train.max_steps", chosen["steps"])))
    val_every = max(1, steps // chosen["validations"])
    values = {"data.mode": chosen["mode"], "data.spacing": chosen["spacing"],
              "data.image_size" if chosen["mode"] == "resize" else "data.patch_size": chosen["size"],
              "train.batch_size": chosen["batch_size"], "model.depth": chosen["depth"], "train.schedule": "poly",
              "train.warmup_steps": max(1, round(PLANNER.warmup_share * steps)), "train.max_steps": steps,
              "train.val_every": val_every, "train.epochs": 0, "train.batch_dice": True}
    why = explain(chosen, weighed=weighed, fp=fp, budget_minutes=budget_minutes, steps=steps, val_every=val_every,
                  explicit=explicit, speed=speed)
    return values, why, {"chosen": chosen, "weighed": weighed, "speed_fit": fit}


def explicit_reason(key, value):
    """Why a key kept its value; an explicit epoch limit can end a run before its budget does."""
    if key == "train.epochs" and int(value):
        return (f"set explicitly: training stops after {int(value)} epochs even if the budget buys more "
                f"steps, with the learning rate mid-schedule (train.epochs 0: no limit)")
    return "set explicitly"
