"""Distributed data parallel under torchrun: one process per GPU (or per CPU slot), one code path.

    torchrun --nproc_per_node=N main.py ...       # or evaluate.py ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env` joins the process group (NCCL on
CUDA, gloo on CPU) and pins each process to its GPU. Without those variables (a plain `python
main.py`) no process group is made and every helper here is the single-process identity: the
same code path runs, with world size 1. Collectives are PyTorch's own (torch.distributed); the
model is wrapped in torch.nn.parallel.DistributedDataParallel.
Rule for callers: a decision that changes control flow (stop training, skip a step) goes through
`broadcast_flag`, so every rank takes the same branch and none waits forever in a collective.
"""
import logging
import os
import sys

import torch
import torch.distributed as dist

from runtime.device import resolve_device

log = logging.getLogger(__name__)


def active():
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """Rank 0 (also before init: read from torchrun's RANK variable, 0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device="auto"):
    """Join torchrun's process group when WORLD_SIZE > 1; returns the device this process computes on.

    `device` is train.device, decided by runtime/device.resolve_device (the single-process callers
    ask it too, so both agree). Under DDP each process uses GPU LOCAL_RANK (backend NCCL); on CPU the
    backend is gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if world <= 1:
        return chosen
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = chosen.type == "cuda"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs on this node; "
                               f"lower --nproc_per_node")
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if dist.get_rank() == 0:
        log.info("distributed: %d processes, backend %s", dist.get_world_size(), backend)
    return torch.device("cuda", local) if use_cuda else chosen


def cleanup():
    """Tear the process group down. On a normal exit every rank first waits for the others: a rank
    that destroyed its gloo group while rank 0 was still writing reports was seen to abort at exit
    (SIGABRT, "terminate called without an active exception"). After an error no rank waits, since
    the others may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def _collective_device():
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if active():
        dist.barrier()


def all_reduce_sum(tensor):
    """The element-wise sum over ranks (a new tensor on the input's device; the input itself with one process)."""
    if not active():
        return tensor
    summed = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


def broadcast_flag(flag):
    """True on every rank when it is true on any rank: the agreed answer to "stop now?"."""
    if not active():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable object, e.g. the run folder's name)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. per-case results)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module):
    """Copy rank 0's buffers (e.g. batch norm running statistics) to every rank."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def wrap_model(model, device, sync_batchnorm=False):
    """DistributedDataParallel around `model` (unchanged with one process); batch norm becomes
    SyncBatchNorm when asked, so its statistics cover the whole global batch."""
    if not active():
        return model
    if sync_batchnorm and device.type != "cuda":
        if is_main():
            log.warning("SyncBatchNorm runs on GPUs only: on CPU each process normalises over its own batch")
    elif sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
