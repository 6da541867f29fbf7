"""Where a training step's time goes: torch.profiler over training/step.train_step, grouped by operator kind.

    python bench.py --profile [--quick]

Each operator's self time is charged to the kind of its outermost recognisable context: the loss
(forward under a "loss" label, backward as the loss's autograd nodes), the optimizer (Adam, gradient
clipping), or the model operator that called it (a convolution's bias-gradient sum is convolution
time), except that a copy is a copy wherever it happens (a norm that reorders its input's layout
shows as copies). What matches nothing is "other" (allocation, views, autograd bookkeeping).
Shares are of self CPU time on the calling thread, so one run's shares are comparable, not its seconds
with a bench step's.
"""
import torch
from torch.profiler import ProfilerActivity, profile, record_function

KINDS = ("convolutions", "norms", "activations", "copies/conversions", "loss", "optimizer", "other")
# Substrings of operator and autograd-node names, lower-cased, checked in this order
PATTERNS = (
    ("loss", ("loss", "binary_cross_entropy", "binarycrossentropy", "sigmoid", "sumbackward", "mulbackward", "divbackward",
              "meanbackward", "addbackward", "rsubbackward", "subbackward")),
    ("optimizer", ("optimizer", "_foreach", "_fused_adam", "clip_grad", "linalg_vector_norm")),
    ("convolutions", ("conv",)),
    ("norms", ("norm",)),
    ("activations", ("relu",)),
    ("copies/conversions", ("aten::cat", "catbackward", "aten::to", "tocopy", "aten::copy_", "aten::clone",
                            "aten::contiguous", "clonebackward")),
)


def kind_of(name):
    """The kind of one event name, or None when the name says nothing about it."""
    name = name.lower()
    for kind, keys in PATTERNS:
        if any(key in name for key in keys):
            return kind
    return None


def event_kind(event):
    """The loss or the optimizer when either encloses the event; else a copy is a copy wherever it
    happens (a layout round trip inside a norm is what we look for); else the kind of the outermost
    ancestor (the event itself included) whose name has one."""
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    kinds = [kind for kind in map(kind_of, (e.name for e in reversed(chain))) if kind is not None]
    if not kinds:
        return "other"
    if kinds[0] in ("loss", "optimizer") or kind_of(chain[0].name) != "copies/conversions":
        return kinds[0]
    return "copies/conversions"


def labelled_loss(loss_fn):
    """loss_fn with its forward under a "loss" profiler label."""
    def loss(logits, target):
        with record_function("loss"):
            return loss_fn(logits, target)
    return loss


def kind_shares(step, repeats=2):
    """{kind: share of self CPU time} and total seconds over `repeats` calls of `step` (after one warm-up)."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        totals[event_kind(event)] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {kind: t / whole for kind, t in totals.items()}, whole / 1e6 / repeats


def profile_steps(cfg, device, sizes, dtypes, make_step):
    """One row per (size, precision): the step's seconds under the profiler and its kind shares.
    make_step(cfg, size, amp_dtype) builds the step (bench.py: the real train_step, loss labelled)."""
    rows = []
    for size in sizes:
        for dtype in dtypes:
            shares, seconds = kind_shares(make_step(cfg, size, dtype))
            rows.append({"size": size, "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
                         "profiled_step_s": seconds, **shares})
    return rows


def format_profile(rows):
    head = f"{'step':<12}{'prec':<6}{'s':>7}" + "".join(f"{k.split('/')[0][:11]:>12}" for k in KINDS)
    lines = [head]
    for r in rows:
        lines.append(f"{r['size']}^3 b1".ljust(12) + f"{r['precision']:<6}{r['profiled_step_s']:>7.2f}"
                     + "".join(f"{r[k]:>12.0%}" for k in KINDS))
    return "\n".join(lines)
