"""Where a step or a prediction runs, and the fast paths its model takes there.

Training, evaluation, prediction and the benchmarks all resolve the device here, so a run and an
evaluation of its checkpoint run alike and the error for a missing GPU is written once.
"""
import torch

from runtime.checkpoint import unwrap


def resolve_device(name):
    """The device of train.device: "auto" takes CUDA when available. Under torchrun
    distributed.init_from_env pins each process to its GPU, so "cuda" means that one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use --train.device cpu")
    return torch.device(name)


def prepare_model(model, train_cfg, device):
    """The model as a step and a prediction run it: channels-last memory layout (train.channels_last)
    and torch.compile (train.compile). Same code on CPU and CUDA; checkpoint.unwrap undoes compile."""
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d if unwrap(model).dims == 3 else torch.channels_last)
    if train_cfg.compile:
        model = torch.compile(model)
    return model
