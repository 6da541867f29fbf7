"""Plan the 2D slices recipe (data.mode slices) from the data and the time budget.

The candidates are in-plane slice sizes, from the training cases' median (H, W) down to half of it
(PLANNER.slice_factors, multiples of 2**depth), and network widths (PLANNER.slice_widths). Each
costs seconds a step by a model fitted to training's own step, timed at the smallest size with
the narrowest and the widest width: seconds = k x pixels in the batch x width**p (p from the two
widths; PLANNER.slice_width_exponent when only one was timed). The plan takes the costliest
candidate for which the budget, after validation's share, buys the steps of slice_target_epochs
passes over the training slices, else the cheapest. The steps every candidate buys grow with the
budget, so a larger budget never gives a cheaper recipe. Depth, batch, 2.5D context and learning
rate follow fixed rules; the schedule is poly over the planned steps with a short warm-up. A key
given explicitly is taken as given and the rest is planned around it. Why these figures:
docs/training.md (The 2D slices plan) and docs/lgg.md (What the planner chooses).
"""
import math

from config import PLANNER, DataConfig


def _size(value):
    """An explicit data.image_size as the [H, W] slices mode trains at (its last two numbers)."""
    values = [int(v) for v in ([value] if isinstance(value, (int, float)) else value)]
    return (values * 2)[-2:] if len(values) == 1 else values[-2:]


def slice_depth(size, explicit):
    """Downsamplings while the bottleneck keeps slice_min_bottleneck pixels a side, at most slice_max_depth."""
    if "model.depth" in explicit:
        return int(explicit["model.depth"])
    depth = 1
    while depth < PLANNER.slice_max_depth and min(size) / 2 ** (depth + 1) >= PLANNER.slice_min_bottleneck:
        depth += 1
    return depth


def slice_sizes(fp, explicit):
    """[(size [H, W], depth)] to weigh, largest first: the median case's in-plane size times each of
    slice_factors, rounded to multiples of 2**depth; only the explicit data.image_size when given."""
    if "data.image_size" in explicit:
        size = _size(explicit["data.image_size"])
        return [(size, slice_depth(size, explicit))]
    sizes = []
    for factor in PLANNER.slice_factors:
        raw = [n * factor for n in fp["median_shape"][1:]]
        depth = slice_depth(raw, explicit)
        size = [max(2 ** depth, 2 ** depth * round(n / 2 ** depth)) for n in raw]
        if (size, depth) not in sizes:
            sizes.append((size, depth))
    return sizes


def slice_widths(explicit):
    """model.base_channels to weigh, widest first: the explicit one, else slice_widths."""
    if "model.base_channels" in explicit:
        return [int(explicit["model.base_channels"])]
    return sorted(PLANNER.slice_widths, reverse=True)


def slice_context(fp, explicit):
    """(data.slice_context, model.in_channels, why): as given, one derived from the other, or
    PLANNER.slice_context neighbours a side when the median case has slices for them."""
    channels = int(explicit.get("data.channels", len(fp.get("intensity", [])) or DataConfig.channels))
    if "data.slice_context" in explicit:
        context, why = int(explicit["data.slice_context"]), "set explicitly"
    elif "model.in_channels" in explicit:
        context = max(0, (int(explicit["model.in_channels"]) // channels - 1) // 2)
        why = f"implied by the explicit model.in_channels ({channels} channels a slice)"
    elif fp["median_shape"][0] >= 2 * PLANNER.slice_context + 1:
        context = PLANNER.slice_context
        why = (f"{context} neighbouring slice(s) each side (2.5D) as channels: they cost only the first "
               f"convolution; on LGG as good as one slice")
    else:
        context, why = 0, "one slice: the median case has too few slices for neighbours"
    return context, int(explicit.get("model.in_channels", channels * (2 * context + 1))), why


def timing_points(fp, explicit):
    """[(size, depth, width)] training's step is timed at: the smallest size weighed, with the
    narrowest width and then the widest (one point when only one width is weighed)."""
    (size, depth), widths = slice_sizes(fp, explicit)[-1], slice_widths(explicit)
    return [(size, depth, width) for width in sorted({widths[-1], widths[0]})]


def _power_fit(points, key):
    """(k, p, check) of seconds = k * voxels * width**p over the timed points (`voxels`: pixels in
    the batch), p from the narrowest and widest; `check`: what p = 2 would have predicted at the widest."""
    narrow, wide = min(points, key=lambda p: p["base_channels"]), max(points, key=lambda p: p["base_channels"])
    narrow_rate, wide_rate = narrow[key] / narrow["voxels"], wide[key] / wide["voxels"]  # seconds a pixel
    exponent, check = PLANNER.slice_width_exponent, None
    if wide["base_channels"] > narrow["base_channels"]:
        widths = wide["base_channels"] / narrow["base_channels"]
        exponent = min(3.0, max(0.0, math.log(wide_rate / narrow_rate) / math.log(widths)))
        check = {"width": wide["base_channels"], "measured": wide[key],
                 "width_squared_predicts": narrow_rate * wide["voxels"] * widths ** 2}
    return narrow_rate / narrow["base_channels"] ** exponent, exponent, check


def fit_slice_speed(speed):
    """{"step": (k, p), "forward": (k, p), "check": ...}: seconds of a step (a forward) of a batch of
    `voxels` pixels at width w = k * voxels * w**p, fitted to the speed table's points."""
    step_k, step_p, check = _power_fit(speed["points"], "step_seconds")
    forward_k, forward_p, _ = _power_fit(speed["points"], "forward_seconds")
    return {"step": [step_k, step_p], "forward": [forward_k, forward_p], "check": check}


def seconds_for(line, voxels, width):
    return line[0] * voxels * width ** line[1]


def weigh(size, depth, width, *, fit, budget_s, val_cases, slices, batch):
    """Steps and validations one (size, width) buys: validation takes at most val_share of the
    budget and max_validations rounds, at least one; the rest buys steps."""
    pixels = math.prod(size)
    step_s = seconds_for(fit["step"], batch * pixels, width)
    val_s = val_cases * slices * seconds_for(fit["forward"], pixels, width)
    reserved = min(max(PLANNER.val_share * budget_s, val_s), PLANNER.max_validations * val_s)
    validations = max(1, min(PLANNER.max_validations, int(reserved // val_s))) if val_s > 0 else 1
    return {"size": size, "depth": depth, "base_channels": width, "batch_size": batch, "step_seconds": step_s,
            "validation_seconds": val_s, "validations": validations,
            "steps": int(max(0.0, budget_s - reserved) // step_s)}


def target_steps(fp, explicit, batch):
    """Steps of slice_target_epochs passes over the training slices (the cases times the median
    case's slices, or data.slices_per_case), in batches of `batch`."""
    per_case = int(explicit.get("data.slices_per_case", 0)) or fp["median_shape"][0]
    return math.ceil(PLANNER.slice_target_epochs * fp["n_cases"] * per_case / batch)


def pick(weighed, target):
    """The costliest candidate that buys `target` steps, else the cheapest."""
    enough = [c for c in weighed if c["steps"] >= target]
    if enough:
        return max(enough, key=lambda c: (c["step_seconds"], math.prod(c["size"])))
    return min(weighed, key=lambda c: (c["step_seconds"], -math.prod(c["size"])))


def _px(size):
    return "x".join(str(int(s)) for s in size)


def choice_reason(c, weighed, budget_minutes, target):
    """Why this (size, width): the rule's branch, the steps it buys and those of the next costlier."""
    costlier = [w for w in weighed if w["step_seconds"] > c["step_seconds"]]
    nearest = min(costlier, key=lambda w: w["step_seconds"]) if costlier else None
    other = (f"; the next costlier, {_px(nearest['size'])} at width {nearest['base_channels']}, buys "
             f"{nearest['steps']}" if nearest else "; nothing costlier is weighed")
    epochs = f"{target} steps ({PLANNER.slice_target_epochs} passes over the training slices)"
    head = (f"the costliest (size, width) for which {budget_minutes:g} min buys >= {epochs}"
            if c["steps"] >= target else f"no (size, width) buys {epochs} in {budget_minutes:g} min: the cheapest")
    return f"{head} ({c['steps']} steps of {c['batch_size']} slices{other})"


def speed_reason(speed, fit):
    """How a step's seconds were modelled, and the width-squared model checked against the timing."""
    check, (_, p) = fit["check"], fit["step"]
    timed = ", ".join(f"{_px(q['size'])} width {q['base_channels']}: {q['step_seconds']:.3f} s"
                      for q in speed["points"])
    if check is None:
        return f"seconds a step ~ pixels x width^{p:g} (one width timed: {timed})"
    return (f"seconds a step ~ pixels x width^{p:.2f}, fitted to training's step timed at {timed} "
            f"(width^2 would predict {check['width_squared_predicts']:.3f} s at width {check['width']})")


def explain(c, *, fp, weighed, budget_minutes, target, context, validations, speed, fit):
    """A short reason for each key the 2D plan sets; `context`: slice_context's answer."""
    native = _px(fp["median_shape"][1:])
    choice = choice_reason(c, weighed, budget_minutes, target)
    return {
        "data.image_size": f"from the cases' median {native} down to half of it: {choice}",
        "model.base_channels": f"of {', '.join(map(str, PLANNER.slice_widths))}, with the slice size: {choice}",
        "model.depth": (f"downsample while the bottleneck keeps >= {PLANNER.slice_min_bottleneck} pixels a side, "
                        f"at most {PLANNER.slice_max_depth} (depth 3 scored lower on LGG)"),
        "train.batch_size": f"{PLANNER.slice_batch} slices: batch norm's statistics over {PLANNER.slice_batch} "
                            f"slices, as the LGG reference trains",
        "data.slice_context": context[2],
        "model.in_channels": "data.channels x (2 x data.slice_context + 1)",
        "train.lr": f"{PLANNER.slice_lr:g} with poly decay (on LGG 3e-4 and 2e-3 scored lower)",
        "train.schedule": "poly over the planned steps, so the learning rate ends when the budget does",
        "train.warmup_steps": f"linear warm-up over {PLANNER.warmup_share:.0%} of the steps",
        "train.max_steps": (f"{budget_minutes:g} min less {validations} validation(s) of ~"
                            f"{c['validation_seconds']:.1f} s, at {c['step_seconds']:.3f} s a step of "
                            f"{c['batch_size']} x {_px(c['size'])} (training's step with its data loading)"),
        "train.val_every": (f"{validations} validation(s) (<= {PLANNER.val_share:.0%} of the budget, "
                            f"<= {PLANNER.max_validations})"),
        "train.epochs": "no epoch limit: train.max_steps and train.max_minutes end the run",
        "speed": speed_reason(speed, fit),
    }


def plan_slices(fp, budget_minutes, speed, *, explicit, val_cases):
    """2D slices: size, width, depth, batch, 2.5D context, learning rate and schedule by the rule of
    the module docstring; returns (values, why, estimates)."""
    fit, budget_s = fit_slice_speed(speed), 60.0 * budget_minutes
    batch = int(explicit.get("train.batch_size", PLANNER.slice_batch))
    weighed = [weigh(size, depth, width, fit=fit, budget_s=budget_s, val_cases=val_cases,
                     slices=fp["median_shape"][0], batch=batch)
               for size, depth in slice_sizes(fp, explicit) for width in slice_widths(explicit)]
    target = target_steps(fp, explicit, batch)
    chosen = pick(weighed, target)
    steps = max(1, int(explicit.get("train.max_steps", chosen["steps"])))
    validations = min(chosen["validations"], steps)
    context = slice_context(fp, explicit)
    values = {"data.image_size": chosen["size"], "model.base_channels": chosen["base_channels"],
              "model.depth": chosen["depth"], "train.batch_size": batch, "data.slice_context": context[0],
              "model.in_channels": context[1], "train.lr": PLANNER.slice_lr, "train.schedule": "poly",
              "train.warmup_steps": max(1, round(PLANNER.warmup_share * steps)), "train.max_steps": steps,
              "train.val_every": max(1, steps // validations), "train.epochs": 0}
    why = explain(chosen, fp=fp, weighed=weighed, budget_minutes=budget_minutes, target=target, context=context,
                  validations=validations, speed=speed, fit=fit)
    return values, why, {"chosen": chosen, "weighed": weighed, "speed_fit": fit, "validations": validations,
                         "target_steps": target}


def slice_constants():
    """The figures a 2D plan used, as plan.json records them."""
    return {"SLICE_FACTORS": list(PLANNER.slice_factors), "SLICE_WIDTHS": list(PLANNER.slice_widths),
            "SLICE_TARGET_EPOCHS": PLANNER.slice_target_epochs, "SLICE_MAX_DEPTH": PLANNER.slice_max_depth,
            "SLICE_MIN_BOTTLENECK": PLANNER.slice_min_bottleneck, "SLICE_BATCH": PLANNER.slice_batch,
            "SLICE_CONTEXT": PLANNER.slice_context, "SLICE_LR": PLANNER.slice_lr,
            "SLICE_WIDTH_EXPONENT": PLANNER.slice_width_exponent, "VAL_SHARE": PLANNER.val_share,
            "MAX_VALIDATIONS": PLANNER.max_validations, "WARMUP_SHARE": PLANNER.warmup_share}
