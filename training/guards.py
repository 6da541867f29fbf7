"""What ends a run, or a step, early: a stop signal, a NaN/Inf step, a score that stopped improving.

Each decision that changes control flow goes through distributed.broadcast_flag, so under DDP
every rank takes the same branch and none waits forever in a collective.
"""
import logging
import math
import signal
import threading

import torch

from runtime import distributed

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot go on (diverged); last.pt still holds the last good epoch."""


class EarlyStopping:
    """Counts epochs without improvement of a higher-is-better score."""

    def __init__(self, patience, best=-math.inf, bad_epochs=0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def update(self, score):
        """Record a score; True when it is a new best."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self):
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self):
        return {"patience": self.patience, "best": self.best, "bad_epochs": self.bad_epochs}


class GracefulStop:
    """SIGINT/SIGTERM set a flag the loop checks after each step, instead of killing it mid-write."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: the user means it
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: finishing this step, then writing last.pt", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self):
        return self.signal is not None


class BadStepGuard:
    """Skips steps whose loss or gradient is NaN/Inf; too many in a row stop training."""

    def __init__(self, limit):
        self.limit, self.in_a_row = limit, 0

    def check(self, value, what):
        # under DDP the ranks agree: one rank's NaN loss skips the step everywhere (else the others
        # would wait in backward's all-reduce for a rank that never joins)
        if not distributed.broadcast_flag(not torch.isfinite(value)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        log.warning("non-finite %s (%s): step skipped (%d in a row)", what, value.item(), self.in_a_row)
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingStopped(f"{self.in_a_row} consecutive steps with a NaN/Inf loss or gradient; "
                                  f"training stopped, last.pt holds the last good epoch (lower train.lr?)")
        return False
