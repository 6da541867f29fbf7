"""Cases kept in memory between passes over the same files."""
from cases.h5 import read_case


class CaseCache:
    """Cases read from disk once and kept in memory up to `budget_bytes`, for a pass that reads
    the same cases every epoch (validation); cases beyond the budget are re-read each time."""

    def __init__(self, fmt, budget_bytes):
        self.fmt, self.budget, self.cases, self.nbytes = fmt, budget_bytes, {}, 0

    def read(self, path):
        if path in self.cases:
            return self.cases[path]
        case = read_case(path, self.fmt)
        size = case.image.nbytes + case.mask.nbytes
        if self.nbytes + size <= self.budget:
            self.cases[path], self.nbytes = case, self.nbytes + size
        return case
