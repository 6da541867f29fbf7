"""The random state a run starts from: Python's, NumPy's and torch's generators, and deterministic kernels."""
import os
import random

import numpy as np
import torch


def seed_everything(seed, deterministic=False):
    """Seed every global generator; `deterministic` (train.deterministic) also asks for reproducible
    kernels, at some cost in speed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
