"""torchrun with 2 processes (gloo on CPU): rank 0 alone writes, the checkpoint loads in one process,
a 2-process evaluation equals a 1-process one, and a resumed DDP run ends as an unbroken one does.

Every torchrun here starts this file as its script: the `__main__` block below installs an audit
hook that reports each file write under WATCH_DIR with the writing rank, then runs the real script.
"""
import csv
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch.distributed

from config import from_dict
from conftest import ROOT, write_blob_dataset
from model import build_model
from runtime.checkpoint import load_checkpoint, load_weights

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this PyTorch build has no torch.distributed")

TINY = ["--data.image_size", "16", "--model.base_channels", "4", "--model.depth", "2", "--data.num_workers", "0",
        "--train.batch_size", "2", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2"]
MARK = "DDP-TEST-WRITE"
OUTPUTS = {"config.json", "split.json", "metrics.csv", "curves.png", "last.pt", "last.prev.pt", "best.pt",
           "summary.json", "per_case.csv", "postprocessing.json"}


def launch(tmp, script, *args, procs=2):
    """Run main.py or evaluate.py under torchrun (procs > 1) or plainly; returns (stdout+stderr, writes)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WATCH_DIR": str(tmp)}
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--standalone"]
    else:
        head = [sys.executable]
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    result = subprocess.run([*head, os.path.abspath(__file__), os.path.join(ROOT, script), *map(str, args)],
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    writes = [line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith(MARK)]
    return out, writes


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    write_blob_dataset(str(data), n_cases=8, shape=(16, 18, 16))
    out, writes = launch(tmp, "main.py", "--data.dir", data, "--train.out_dir", tmp / "runs", "--train.name", "r",
                         "--train.epochs", "2", *TINY)
    return tmp, data, tmp / "runs" / "r", out, writes


def test_only_rank_0_writes(ddp_run):
    tmp, _, run_dir, out, writes = ddp_run
    assert writes and {rank for rank, _ in writes} == {"0"}, writes  # the hook saw rank 0 write, nobody else
    assert set(os.listdir(run_dir)) == OUTPUTS
    assert sorted(os.listdir(tmp)) == ["cwd", "data", "runs"] and os.listdir(tmp / "cwd") == []
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert out.count("epoch 2: train loss") == 1  # rank 0 alone logs progress
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["cases"] == len(json.load(open(run_dir / "split.json"))["test"]) == 2


def test_checkpoint_loads_in_one_process(ddp_run):
    state = load_checkpoint(str(ddp_run[2] / "best.pt"))
    assert not any(key.startswith("module.") for key in state["model"])  # saved unwrapped
    model = build_model(from_dict(state["config"]).model)
    load_weights(model, state)


def test_two_process_evaluation_equals_one_process(ddp_run):
    tmp, data, run_dir, _, _ = ddp_run
    common = ["--checkpoint", run_dir / "best.pt", "--data.dir", data, "--split", "all", "--no-overlays"]
    _, writes = launch(tmp, "evaluate.py", *common, "--out", tmp / "eval2", procs=2)
    assert {rank for rank, _ in writes} == {"0"}, writes
    launch(tmp, "evaluate.py", *common, "--out", tmp / "eval1", procs=1)
    two, one = (json.load(open(tmp / name / "summary.json")) for name in ("eval2", "eval1"))
    assert two["cases"] == one["cases"] == 8
    assert two["regions"] == one["regions"]
    assert open(tmp / "eval2" / "per_case.csv").read() == open(tmp / "eval1" / "per_case.csv").read()


def test_ddp_run_resumes_as_if_never_stopped(ddp_run):
    """2 epochs, then --resume to 3, end exactly where an unbroken 3-epoch DDP run ends: the same
    metrics.csv rows (but their seconds) and the same weights."""
    tmp, data, run_dir, _, _ = ddp_run
    out, writes = launch(tmp, "main.py", "--resume", run_dir, "--train.epochs", "3")
    assert {rank for rank, _ in writes} == {"0"} and "resuming at epoch 3" in out
    launch(tmp, "main.py", "--data.dir", data, "--train.out_dir", tmp / "runs", "--train.name", "unbroken",
           "--train.epochs", "3", *TINY)

    def rows(folder):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(folder / "metrics.csv"))]

    assert [r["epoch"] for r in rows(run_dir)] == ["1", "2", "3"]
    assert rows(run_dir) == rows(tmp / "runs" / "unbroken")
    resumed, unbroken = (load_checkpoint(str(d / "last.pt"))["model"] for d in (run_dir, tmp / "runs" / "unbroken"))
    for key in unbroken:
        torch.testing.assert_close(resumed[key], unbroken[key], rtol=1e-5, atol=1e-6, msg=key)


def report_writes(event, args):
    """Audit hook: print every file creation, write, rename or removal under WATCH_DIR, with the rank."""
    if event == "open" and isinstance(args[0], str) and (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        path = args[0]
    elif event in ("os.mkdir", "os.rename", "os.remove") and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
    else:
        return
    if os.path.abspath(path).startswith(os.environ["WATCH_DIR"]):
        print(f"{MARK} {os.environ.get('RANK', '0')} {event}:{path}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # started by launch(): watch the writes, then run the real script
    sys.addaudithook(report_writes)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
