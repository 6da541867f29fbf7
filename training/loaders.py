"""Training DataLoaders over a Dataset in a shuffled order that is a pure function of (seed, epoch).

Under DDP each rank takes its shard of that order, read from `distributed` (world size 1 without
torchrun). A resumed partial epoch skips the batches it already took, so it sees the same samples
as an unbroken run, whatever the number of workers.
"""
import os

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from runtime import distributed


def loader_workers(requested, device):
    """-1 picks: 0 on CPU (a worker competes with the step's threads for the same cores), else up to 4."""
    if requested >= 0:
        return requested
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def epoch_order(n, seed, epoch):
    """The sample order of an epoch: a pure function of (seed, epoch), so a resumed run repeats it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def shard_order(n, seed, epoch, rank, world_size):
    """This rank's share of an epoch under DDP: torch's DistributedSampler with set_epoch, which pads
    with repeats so every rank takes the same number of steps (DDP needs it)."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def make_loader(dataset, batch_size, *, num_workers=0, seed=0, epoch=0, pin_memory=False, skip_batches=0):
    """A DataLoader over the epoch's shuffled order (this rank's shard of it under DDP), skipping the
    batches a resumed partial epoch already took."""
    world_size = distributed.world_size()
    if world_size > 1:
        order = shard_order(len(dataset), seed, epoch, distributed.rank(), world_size)
    else:
        order = epoch_order(len(dataset), seed, epoch)
    order = order[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False)
