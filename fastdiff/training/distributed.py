"""DDP under ``torchrun``: one process group per job, gloo on the CPU, nccl on GPUs."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from fastdiff import _checks


class Context(NamedTuple):
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a multi-process ``torchrun`` job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device=None) -> Context:
    """Join the ``torchrun`` process group when launched by it (idempotent); the device of this rank."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = _checks.device_arg("device", device)
    if not launched():
        if dist.is_available() and dist.is_initialized():
            return Context(dist.get_rank(), dist.get_world_size(), device)
        return Context(0, 1, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if ctx.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


def all_ok(ctx: Context, ok: bool) -> bool:
    """Whether every rank is ``ok`` (a barrier that also carries a failure): a rank that failed before a barrier
    says so here instead of leaving the others waiting in it for ever."""
    if ctx.world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
