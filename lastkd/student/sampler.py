"""The sampler of training batches: one global batch order, sliced per DDP rank.

Each of the N ranks takes its ``1/N`` slice of the *same* global batch a single process would
draw, so a DDP run sees the very batches (and, with DDP's gradient averaging, follows the
updates) of the single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from lastkd.student.errors import TrainError
from lastkd.student.rng import mix_seed

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(Sampler[int]):
    """Shuffled indices, grouped into global batches of ``global_batch``; this rank gets its
    contiguous ``1/world`` slice of every global batch. The order is a function of (seed, epoch);
    the trailing partial global batch is dropped so every rank has equal, full batches."""

    def __init__(
        self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, max_batches: int | None = None
    ) -> None:
        if global_batch % world:
            raise TrainError(f"batch_size {global_batch} is not divisible by the {world} DDP ranks")
        if size < global_batch:
            raise TrainError(f"the training split has {size} samples, fewer than batch_size {global_batch}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self.num_batches = size // global_batch
        if max_batches is not None:
            self.num_batches = min(self.num_batches, max_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.local_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5A3))
        perm = torch.randperm(self.size, generator=g).tolist()
        lo = self.rank * self.local_batch
        for b in range(self.num_batches):
            start = b * self.global_batch + lo
            yield from perm[start : start + self.local_batch]
