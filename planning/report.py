"""The plan as people read it: the printed summary and plan.json."""
import json
import logging
import os

from runtime.atomic import write_json

log = logging.getLogger(__name__)


def _show(value):
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def format_plan(plan):
    """The plan as one readable block for the log."""
    inputs = plan["inputs"]
    head = (f"plan for {inputs['budget_minutes']:g} min on {inputs['speed'].get('device', '?')}, "
            f"{inputs['fingerprint']['n_cases']} training cases:" if plan["values"] else "plan: nothing planned")
    lines = [head]
    for key, value in plan["values"].items():
        lines.append(f"  {key:<20} {_show(value):<14} {plan['why'].get(key, '')}")
    lines += [f"  {reason}" for key, reason in plan["why"].items() if key not in plan["values"]]
    return "\n".join(lines)


def write_plan(run_dir, plan):
    """plan.json in the run folder, written atomically; returns its path."""
    path = os.path.join(run_dir, "plan.json")
    write_json(path, plan)
    return path


def record_made_steps(run_dir, made):
    """Write the optimizer steps training made into the run's plan.json beside the planned ones
    ({"steps": {"planned", "made"}}); returns the plan, or None for a run without a plan."""
    path = os.path.join(run_dir, "plan.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the run's plan ({err})") from None
    planned = plan.get("steps", {}).get("planned", plan.get("values", {}).get("train.max_steps"))
    plan["steps"] = {"planned": planned, "made": int(made)}
    log.info("steps: %s planned, %d made", planned, made)
    write_plan(run_dir, plan)
    return plan
