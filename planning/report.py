"""The plan as people read it: the printed summary and plan.json."""
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
