"""Plan the training recipe from the data and the time budget (issue 12).

plan_recipe(fp, budget_minutes, speed, explicit) is a pure function of fingerprint.fingerprint (what
the training cases look like) and fingerprint.measure_speed (seconds per step on the device): the
config values to train with, each with the reason it was chosen. reporting.format_plan and
reporting.write_plan show it.

The rule, in order. Candidate spacings run from the data's native spacing to twice it. At each,
the samples are the whole brain-cropped median case resampled there ("resize") when it fits
VOXEL_CAP, and smaller patches of PATCH_LADDER's sizes (128^3 down to 64^3 voxels) with the case's
aspect ratio ("patch"), largest first. Spacings are weighed finest first; at each, the plan takes
the largest sample for which the budget buys TARGET_STEPS optimizer steps after validation takes
its share, else the smallest sample if it still buys MIN_STEPS, else it moves to the next spacing
(the coarsest's smallest sample when none does). The steps a candidate buys never fall as the
budget grows, so a smaller budget never gives a finer spacing. Then the widest measured
network width that still gets TARGET_STEPS there. The learning rate follows a poly schedule over the
planned steps with a short warm-up, so it reaches its end when the budget ends.
A key given explicitly is taken as given and the rest is planned around it.
"""
import math

from planning.speed import BATCH_SIZE, fit_speed, seconds_at
from transforms.resample import resampled_shape

# Measured on ten real BraTS cases (docs/accuracy.md), one core: steps matter more than a larger
# patch at these budgets. 1 mm 64^3 patches with ~800 poly steps in 20 minutes (Dice WT/TC/ET
# 0.887/0.805/0.795) beat 72x88x72 patches with ~690 steps in 30 minutes (0.869/0.763/0.788), ~400
# in 20 (0.874/0.675/0.712), and the whole brain at 2 mm with 360 (0.788/0.522/0.598). So at each
# spacing the plan takes the largest sample that buys TARGET_STEPS; when none does, it keeps that
# spacing with its smallest sample (64^3) as long as that buys MIN_STEPS, and coarsens the grid
# only below. TARGET_STEPS is 1000, not 800, because those runs made ~18% fewer steps than the
# few seconds of timing before training promised (another job shared the machine).
TARGET_STEPS = 1000
MIN_STEPS = 400
# Candidate spacings as multiples of the data's finest native spacing (1 mm data: 1 to 2 mm; the
# MONAI BraTS recipe trains at 2 mm). No axis is ever resampled finer than its native spacing.
SPACING_FACTORS = (1.0, 1.25, 1.5, 1.75, 2.0)
# Largest sample (voxels per case in a batch): nnU-Net's BraTS patch at 1 mm is 128^3. A whole
# resampled brain within it is served whole (resize mode); a larger one is cut into patches of it.
VOXEL_CAP = 128 ** 3
# Patch sizes weighed at a spacing, largest first (voxels; shaped like the case): 128^3 down to 64^3,
# the patch the measured 1 mm winner used and MONAI's BraTS tutorial uses at 2 mm.
PATCH_LADDER = (128 ** 3, 112 ** 3, 96 ** 3, 80 ** 3, 64 ** 3)
# Downsample until the smallest axis of the bottleneck is 4 voxels (as nnU-Net).
MIN_BOTTLENECK = 4
# ...but at most 3 times (the default network's depth, 1.4 M parameters at width 16), not nnU-Net's
# 5: under a CPU budget of a few hundred steps, both recipes measured to win (the whole brain
# at 80x96x80 and 1 mm 64^3 patches, docs/accuracy.md) ran depth 3, and both planned runs that lost
# ran depth 4 (5.6 M parameters), so the deeper network is what this budget cannot train.
MAX_DEPTH = 3
VAL_SHARE = 0.10          # validation may take at most this share of the budget
# ...and happens at most this often: enough points for a curve and the best checkpoint; the
# estimate counts forwards only (not reading, resampling back, scoring), so more would cost more.
MAX_VALIDATIONS = 20
VAL_OVERLAP = 0.5         # patch mode: sliding-window overlap of validation (eval.overlap's default)
VAL_SW_BATCH = 1          # patch mode: windows per forward in validation (eval.sw_batch_size auto, on a CPU)
VAL_FRACTION = 0.15       # validation cases as a share of the cases when not given (data.val_fraction's default)
WARMUP_SHARE = 0.03       # linear warm-up over this share of the planned steps


def _three(value):
    """An explicit size or spacing (one number or three) as a list of 3."""
    if isinstance(value, (int, float)):
        return [value] * 3
    values = list(value)
    return values * 3 if len(values) == 1 else values


def plan_depth(min_side, explicit):
    """Downsamplings until the bottleneck's smallest side would drop under MIN_BOTTLENECK voxels."""
    if "model.depth" in explicit:
        return int(explicit["model.depth"])
    depth = 1
    while depth < MAX_DEPTH and min_side / 2 ** (depth + 1) >= MIN_BOTTLENECK:
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
    for factor in SPACING_FACTORS:
        spacing = [round(max(s, factor * min(native)), 4) for s in native]
        if spacing not in spacings:
            spacings.append(spacing)
    return spacings


def plan_samples(shape, explicit):
    """The (mode, size, depth) samples to weigh for a resampled median case of `shape`, largest
    first: the whole case when it fits VOXEL_CAP (only it when data.mode resize says so), then
    patches of PATCH_LADDER's voxel counts smaller than it, with the case's proportions, each no
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
        if math.prod(whole) <= VOXEL_CAP:
            samples.append(("resize", whole, depth))
    if "data.patch_size" in explicit:
        patch = [int(s) for s in _three(explicit["data.patch_size"])]
        return [("patch", patch, plan_depth(min(patch), explicit))]
    for voxels in PATCH_LADDER:
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
    """Forward time of validating one median case: the whole resized case, or sliding windows."""
    if mode == "resize":
        return seconds_at(forward, math.prod(size))
    windows = math.prod(1 if n <= p else math.ceil((n - p) / max(1, int(p * (1 - VAL_OVERLAP)))) + 1
                        for n, p in zip(shape, size))
    return math.ceil(windows / VAL_SW_BATCH) * seconds_at(forward, VAL_SW_BATCH * math.prod(size))


def evaluate_candidate(spacing, shape, sample, width, fit, budget_s, val_cases, batch):
    """Steps and validations one (spacing, sample, width) buys within the budget."""
    mode, size, depth = sample
    step_s = seconds_at(fit["step"], batch * math.prod(size))
    val_s = val_cases * validation_seconds(mode, size, shape, fit["forward"])
    # validation's share of the budget, at least one validation, at most MAX_VALIDATIONS: it never
    # shrinks as the budget grows, so neither do the steps (what keeps the spacing rule monotone)
    reserved = min(max(VAL_SHARE * budget_s, val_s), MAX_VALIDATIONS * val_s)
    validations = max(1, min(MAX_VALIDATIONS, int(reserved // val_s))) if val_s > 0 else 1
    steps = int(max(0.0, budget_s - reserved) // step_s)
    return {"spacing": spacing, "shape": list(shape), "mode": mode, "size": size, "depth": depth,
            "base_channels": width, "batch_size": batch, "step_seconds": step_s, "validation_seconds": val_s,
            "validations": validations, "steps": steps,
            "fits": mode == "resize" or all(p <= q for p, q in zip(size, padded_shape(shape, depth)))}


def measured_widths(fits, explicit):
    """Network widths to choose from: the explicit one, else every width the speed table timed."""
    if "model.base_channels" not in explicit:
        return sorted(fits)
    width = int(explicit["model.base_channels"])
    if width not in fits:
        raise ValueError(f"model.base_channels {width}: the speed table timed only {sorted(fits)}; "
                         f"measure_speed(..., widths=[{width}]) first")
    return [width]


def choose(fp, budget_s, fits, explicit, val_cases):
    """The candidate the rule picks, and every spacing weighed (narrowest width) for the record."""
    widths = measured_widths(fits, explicit)
    batch = int(explicit.get("train.batch_size", BATCH_SIZE))

    def at(spacing, width, sample=None):
        shape = resampled_shape(fp["median_shape"], fp["median_spacing"], spacing)
        return [evaluate_candidate(spacing, shape, s, width, fits[width], budget_s, val_cases, batch)
                for s in ([sample] if sample else plan_samples(shape, explicit))]

    by_spacing = [at(spacing, widths[0]) for spacing in candidate_spacings(fp, explicit)]
    weighed = [c for samples in by_spacing for c in samples]
    # an explicit patch larger than the median case at every spacing: the user's choice, at native spacing
    chosen = pick_sample(by_spacing) if any(c["fits"] for c in weighed) else weighed[0]
    for width in reversed(widths[1:]):
        wider = at(chosen["spacing"], width, (chosen["mode"], chosen["size"], chosen["depth"]))[0]
        if wider["steps"] >= TARGET_STEPS:
            return wider, weighed
    return chosen, weighed


def pick_sample(by_spacing):
    """The rule of the module docstring over candidates grouped by spacing (finest first, each
    group largest sample first; at least one fits). A larger budget buys more steps for every
    candidate, so it can only stop at the same spacing or a finer one, never a coarser one."""
    for samples in by_spacing:
        fitting = [c for c in samples if c["fits"]]
        enough = [c for c in fitting if c["steps"] >= TARGET_STEPS]
        if enough:
            return enough[0]
        if fitting and fitting[-1]["steps"] >= MIN_STEPS:
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
            f"{'<=' if c['mode'] == 'resize' else '>'} cap {VOXEL_CAP / 1e6:.2f} M")


def explain(c, weighed, fp, widths, budget_minutes, steps, val_every, explicit, speed):
    """A short reason for each planned key."""
    index = next((i for i, w in enumerate(weighed) if (w["spacing"], w["size"]) == (c["spacing"], c["size"])), 0)
    before = (f"; {weighed[index - 1]['steps']} with {_vox(weighed[index - 1]['size'])} at "
              f"{_mm(weighed[index - 1]['spacing'])}" if index else "")
    if c["steps"] >= TARGET_STEPS:
        spacing_why = (f"finest spacing, then largest sample, for which {budget_minutes:g} min buys >= "
                       f"{TARGET_STEPS} steps ({c['steps']}{before})")
    elif c["steps"] >= MIN_STEPS:
        spacing_why = (f"finest spacing at which the smallest sample still buys >= {MIN_STEPS} steps in "
                       f"{budget_minutes:g} min ({c['steps']}; none buys {TARGET_STEPS} there)")
    else:
        spacing_why = f"no candidate buys {MIN_STEPS} steps in {budget_minutes:g} min; the coarsest"
    size_key = "data.image_size" if c["mode"] == "resize" else "data.patch_size"
    return {
        "data.mode": mode_reason(c, explicit),
        "data.spacing": spacing_why,
        size_key: (f"median brain-cropped case {_vox(fp['median_shape'])} at {_mm(fp['median_spacing'])} -> "
                   f"{_vox(c['shape'])}; " + ("rounded to multiples of 2**depth" if c["mode"] == "resize"
                                              else "the largest of the patch ladder that buys the steps, the case's aspect ratio, within "
                                                   f"the padded shape {_vox(padded_shape(c['shape'], c['depth']))}")),
        "train.batch_size": "2 as nnU-Net in 3D: a larger batch buys fewer steps under a budget",
        "model.base_channels": ("the width the speed table timed" if len(widths) == 1 else
                                f"widest timed width of {widths} that still gets >= {TARGET_STEPS} steps"),
        "model.depth": (f"downsample while the bottleneck keeps >= {MIN_BOTTLENECK} voxels a side (at most "
                        f"{MAX_DEPTH}; speed timed at depth {speed.get('depth', '?')})"),
        "train.schedule": "poly over the planned steps, so the learning rate ends when the budget does",
        "train.warmup_steps": f"linear warm-up over {WARMUP_SHARE:.0%} of the steps",
        "train.max_steps": (f"{budget_minutes:g} min less {c['validations']} validation(s), at "
                            f"{c['step_seconds']:.3f} s a step of {c['batch_size']} x {_vox(c['size'])}"),
        "train.val_every": (f"{c['validations']} validation(s) of ~{c['validation_seconds']:.1f} s each "
                            f"(<= {VAL_SHARE:.0%} of the budget, <= {MAX_VALIDATIONS}): every {val_every} of "
                            f"{steps} steps"),
        "train.epochs": "no epoch limit: train.max_steps and train.max_minutes end the run",
        "train.batch_dice": "Dice over the batch (nnU-Net for BraTS regions): ET-free patches still add gradient",
    }


def plan_recipe(fp, budget_minutes, speed, explicit=None, val_cases=None):
    """The training recipe for a fingerprint, a budget (minutes; 0: none) and a speed table, as
    {"values": {config key: value}, "why": {config key: reason}, "estimates", "inputs", "constants"}.
    Pure: the same inputs give the same plan. A key in `explicit` ({config key: value}) is taken
    as given and the rest planned around it. No budget plans nothing: the plain defaults stay
    (ReduceLROnPlateau, early stopping). val_cases: validation cases (default VAL_FRACTION of n_cases)."""
    explicit = dict(explicit or {})
    val_cases = val_cases or max(1, round(VAL_FRACTION * fp["n_cases"]))
    inputs = {"budget_minutes": budget_minutes, "explicit": explicit, "val_cases": val_cases,
              "speed": speed, "fingerprint": fp}
    constants = {"TARGET_STEPS": TARGET_STEPS, "MIN_STEPS": MIN_STEPS, "SPACING_FACTORS": list(SPACING_FACTORS),
                 "VOXEL_CAP": VOXEL_CAP,
                 "MIN_BOTTLENECK": MIN_BOTTLENECK, "MAX_DEPTH": MAX_DEPTH, "BATCH_SIZE": BATCH_SIZE,
                 "VAL_SHARE": VAL_SHARE, "MAX_VALIDATIONS": MAX_VALIDATIONS, "WARMUP_SHARE": WARMUP_SHARE}
    plan = {"values": {}, "why": {}, "estimates": {}, "inputs": inputs, "constants": constants}
    if not budget_minutes or budget_minutes <= 0:
        plan["why"]["plan"] = "no train.max_minutes: the plain defaults (ReduceLROnPlateau, early stopping)"
        return plan
    if explicit.get("data.mode") == "slices" or int(explicit.get("model.dims", 3)) == 2:
        plan["values"], plan["why"], plan["estimates"] = plan_slices(fp, 60.0 * budget_minutes, speed, explicit,
                                                                     val_cases)
        return plan
    fits = fit_speed(speed)
    chosen, weighed = choose(fp, 60.0 * budget_minutes, fits, explicit, val_cases)
    steps = max(1, int(explicit.get("train.max_steps", chosen["steps"])))
    val_every = max(1, steps // chosen["validations"])
    values = {"data.mode": chosen["mode"], "data.spacing": chosen["spacing"],
              "data.image_size" if chosen["mode"] == "resize" else "data.patch_size": chosen["size"],
              "train.batch_size": chosen["batch_size"], "model.base_channels": chosen["base_channels"],
              "model.depth": chosen["depth"], "train.schedule": "poly",
              "train.warmup_steps": max(1, round(WARMUP_SHARE * steps)), "train.max_steps": steps,
              "train.val_every": val_every, "train.epochs": 0, "train.batch_dice": True}
    why = explain(chosen, weighed, fp, measured_widths(fits, explicit), budget_minutes, steps, val_every, explicit,
                  speed)
    for key in values:
        if key in explicit:
            values[key], why[key] = explicit[key], explicit_reason(key, explicit[key])
    plan["values"], plan["why"] = values, why
    plan["estimates"] = {"chosen": chosen, "weighed": weighed,
                         "speed_fit": {str(w): f for w, f in fits.items()}}
    return plan


def explicit_reason(key, value):
    """Why a key kept its value; an explicit epoch limit can end a run before its budget does."""
    if key == "train.epochs" and int(value):
        return (f"set explicitly: training stops after {int(value)} epochs even if the budget buys more "
                f"steps, with the learning rate mid-schedule (train.epochs 0: no limit)")
    return "set explicitly"


def plan_slices(fp, budget_s, speed, explicit, val_cases):
    """2D slices (the LGG path): the configured network, slice size and batch stay (the preset's,
    or the user's); the plan sets what the budget decides, the schedule: how many steps fit after
    validation's share, validated MAX_VALIDATIONS times, poly decay to 0 when the budget ends.
    `speed` was timed at the configured slice size and batch, so a step's cost is its mean."""
    points = speed["points"]
    step_s = sum(p["step_seconds"] for p in points) / len(points)
    slice_forward_s = sum(p["forward_seconds"] for p in points) / len(points) / speed["batch_size"]
    validation_s = val_cases * fp["median_shape"][0] * slice_forward_s
    validations = max(1, min(MAX_VALIDATIONS, int(VAL_SHARE * budget_s / max(validation_s, 1e-6))))
    steps = max(1, int((budget_s - validations * validation_s) / step_s))
    steps = int(explicit.get("train.max_steps", steps))
    val_every = max(1, steps // validations)
    values = {"train.schedule": "poly", "train.warmup_steps": max(1, round(WARMUP_SHARE * steps)),
              "train.max_steps": steps, "train.val_every": val_every, "train.epochs": 0}
    why = {"train.schedule": "a time budget: the learning rate decays to 0 when the budget ends",
           "train.max_steps": f"{budget_s / 60:g} min at {step_s:.2f} s a step, less {validations} validation(s) "
                              f"of ~{validation_s:.1f} s",
           "train.val_every": f"{validations} validations (<= {VAL_SHARE:.0%} of the budget, <= {MAX_VALIDATIONS})",
           "train.warmup_steps": f"{WARMUP_SHARE:.0%} of the steps",
           "train.epochs": "no epoch limit: train.max_steps and train.max_minutes end the run",
           "plan": "2D slices: network, slice size and batch as configured; only the schedule is planned"}
    for key in values:
        if key in explicit:
            values[key], why[key] = explicit[key], explicit_reason(key, explicit[key])
    return values, why, {"step_seconds": step_s, "validation_seconds": validation_s, "validations": validations}
