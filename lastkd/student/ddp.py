"""The process group of a DDP run (torchrun): rank/world, joining the group, and the collectives
the training loop needs beyond DDP's own gradient averaging.

Every helper is a no-op (or the single-process answer) when no process group is active, so the
loop calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "allreduce_mean_grads",
    "any_rank",
    "broadcast_module",
    "dist_info",
    "gather",
    "init_process_group_from_env",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run: global rank, number of ranks, GPU index on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True in a multi-process run (collectives are needed)."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and reports progress."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank/world of an initialised process group, or the single-process default."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))  # set by torchrun; edge knowledge
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def init_process_group_from_env(use_cuda: bool) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1).

    NCCL when ``use_cuda``, else gloo. True when this call started the group (the caller then
    destroys it); False for a single process or a group that was already initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return False
    if use_cuda:
        # Bind the rank to its GPU before NCCL starts: without device_id NCCL guesses (GPU 0 for
        # every rank until the first collective) and warns; set_device makes "cuda" mean it.
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl", device_id=local)
    else:
        dist.init_process_group(backend="gloo")
    return True


def allreduce_mean_grads(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` over all ranks (a gradient missing on some ranks counts
    as zeros there). When no rank has any gradient (a step whose distillation weight is 0), the
    gradients stay None, so the optimizer skips the parameters: zeros would still let momentum
    and weight decay move them."""
    if not params:
        return
    anyone = torch.tensor([1.0 if any(p.grad is not None for p in params) else 0.0], device=params[0].device)
    dist.all_reduce(anyone, op=dist.ReduceOp.MAX)  # every rank decides the same
    if anyone.item() == 0.0:
        return
    for p in params:
        # every rank must join every all_reduce, also for a parameter unused on this step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def any_rank(flag: bool, di: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop together)."""
    if not di.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(obj: Any, di: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in a single process)."""
    if not di.active:
        return [obj]
    out: list[Any] = [None] * di.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module, di: DistInfo) -> None:
    """Overwrite the parameters and buffers of ``module`` on every rank with rank 0's."""
    if di.active:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
