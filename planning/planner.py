"""Plan a budgeted run: fingerprint the training cases, time training's own step on the device, plan
the recipe for what is left of train.max_minutes and apply it to the config."""
import copy
import json
import logging
import time

from cases.h5 import case_format
from config import PLANNER, Config, apply_dict, check, diff_keys, get_key
from planning.fingerprint import fingerprint
from planning.plan import plan_recipe
from planning.report import format_plan
from planning.slices import slice_context, timing_points
from planning.speed import measure_speed
from runtime import distributed

log = logging.getLogger(__name__)


def speed_sizes(cfg, device):
    """(sample sizes, batch size) the 3D step is timed at: cubes of the planner's sides for the
    device, rounded to multiples of 2**model.depth, largest first (the nearest to the samples the
    plan weighs, so a busy device that times only one still plans from a close one), in the
    planner's batch."""
    step = 2 ** cfg.model.depth
    sides = PLANNER.speed_sides_cuda if device.type == "cuda" else PLANNER.speed_sides_cpu
    cubes = {(max(step, step * round(side / step)),) * 3 for side in sides}
    return sorted(cubes, reverse=True), PLANNER.batch_size


def slice_timing_config(cfg, point, context):
    """cfg training 2D slices of point's (size, depth, width) with context's (data.slice_context,
    model.in_channels, why)."""
    (size, depth, width), timed = point, copy.deepcopy(cfg)
    apply_dict(timed, {"data.image_size": list(size), "model.depth": depth, "model.base_channels": width,
                       "data.slice_context": context[0], "model.in_channels": context[1]})
    return timed


def predicted_timing(last, width, steps=PLANNER.speed_steps):
    """Seconds timing `width` at the size of the timed point `last` would take: its one-time reads
    again, then its warm-up and timed steps and forwards scaled by the square of the width ratio."""
    loop = (steps + 2) * last["step_seconds"] + 3 * last["forward_seconds"]
    return max(0.0, last["seconds"] - loop) + loop * (width / last["base_channels"]) ** 2


def measure_slices(cfg, explicit, fp, paths, device):
    """2D: training's step and loader timed on the first slice_speed_cases training cases at
    planning.slices.timing_points, narrowest width first. The wider point is not timed when its
    timing (predicted_timing) would end past speed_seconds; the plan then assumes
    slice_width_exponent. Returns one speed table."""
    batch = int(explicit.get("train.batch_size", PLANNER.slice_batch))
    cases, context = sorted(paths)[:PLANNER.slice_speed_cases], slice_context(fp, explicit)
    start, table = time.perf_counter(), None
    for point in timing_points(fp, explicit):
        if table is not None and \
                time.perf_counter() - start + predicted_timing(table["points"][-1], point[2]) > PLANNER.speed_seconds:
            log.info("speed: width %d not timed (predicted to end past %g s)", point[2], PLANNER.speed_seconds)
            break
        timed = measure_speed(slice_timing_config(cfg, point, context), cases, device, [tuple(point[0])],
                              batch_size=batch)
        table = timed if table is None else {**table, "points": table["points"] + timed["points"]}
    return {**table, "slice_context": context[0], "cases": len(cases)}


def measure_and_plan(cfg, explicit, paths, device, started):
    """The plan for what is left of the budget once the fingerprint and the speed table are taken
    (both count against it); rank 0's work."""
    explicit = json.loads(json.dumps(explicit))
    begun = time.time()
    fp = fingerprint(paths["train"], case_format(cfg.data), cfg.data.task)
    log.info("planning: fingerprint of %d cases took %.1f s", len(paths["train"]), time.time() - begun)
    if cfg.model.dims == 2:
        speed = measure_slices(cfg, explicit, fp, paths["train"], device)
    else:
        sizes, batch = speed_sizes(cfg, device)
        speed = measure_speed(cfg, paths["train"], device, sizes, batch_size=batch,
                              max_seconds=PLANNER.speed_seconds)
    spent = (time.time() - started) / 60
    log.info("planning: fingerprint and speed measurement took %.1f s", spent * 60)
    left = max(cfg.train.max_minutes - spent, 0.01)  # all spent: a plan for a few steps, which time ends
    return plan_recipe(fp, round(left, 3), speed, explicit, len(paths["val"]) or None)


def make_plan(cfg, explicit, paths, device, started):
    """Plan the recipe for what is left of train.max_minutes from the training cases' fingerprint and
    a short timing of training's step on `device`; apply it to cfg (keys in `explicit` keep their
    values) and return it. None, cfg untouched, without a budget or with train.plan off.
    `paths`: {"train": files, "val": files}; `started`: time.time() when the budget's clock started.
    Rank 0 plans, every rank applies."""
    if cfg.train.plan == "off" or cfg.train.max_minutes <= 0:
        return None
    if explicit is None:
        explicit = {key: get_key(cfg, key) for key in diff_keys(cfg, Config())}
    plan = measure_and_plan(cfg, explicit, paths, device, started) if distributed.is_main() else None
    plan = distributed.broadcast_object(plan)
    apply_dict(cfg, plan["values"])
    check(cfg)
    if distributed.is_main():
        log.info("%s", format_plan(plan))
    return plan
