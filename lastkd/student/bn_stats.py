"""Precise BatchNorm statistics of a LAST v2 student, recomputed over training data.

Why. The running statistics a short run leaves behind are wrong twice over:

* momentum 0.1 from the initial variance 1: after n steps the stored variance is about
  ``0.9**n + true variance``; the input BatchNorm of a stream whose true variance is 1e-4 still
  stores ~0.04 after 30 steps, so in eval that stream is shrunk 20x and predictions collapse;
* training normalises each stream as its own batch in every backbone BatchNorm, while the
  reference keeps one set of statistics blended over the three streams for evaluation.

:func:`recompute_bn_stats` runs the model over (a fixed subset of) the training set, batched as in
training, in train mode for BatchNorm only (dropout off, no gradients), and collects the exact
per-channel mean and variance of every BatchNorm input **per stream** (sums in float64, summed
over DDP ranks when a process group is active). It then sets

* each input BatchNorm ``data_bn[k]`` to its stream's statistics (it only ever sees that stream);
* each backbone BatchNorm's persistent running statistics to the statistics pooled over the
  streams (mean of the three, variance including the spread between the stream means): the best
  single set for the reference forward, so the state dict stays a faithful reference checkpoint;
* and, with ``per_stream``, the per-stream statistics of every backbone BatchNorm
  (:meth:`LASTv2.set_stream_bn_stats`, non-persistent), which the model's eval forward then uses.

``num_batches_tracked`` counters are left as they were, so the state dict differs from an
untouched one only in the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lastkd.models.last_v2 import STREAM_ORDER, LASTv2

BN_MODES = ("per_stream", "shared", "running")


class _Moments:
    """Per-channel float64 sum, sum of squares and element count of one BatchNorm's inputs."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        self.sum += x.sum(dim=dims)
        self.sq += x.square().sum(dim=dims)
        self.count += x.numel() // x.shape[1]

    def flat(self) -> Tensor:
        return torch.cat([self.sum, self.sq, self.count.reshape(1)])

    def load_flat(self, flat: Tensor) -> None:
        c = self.sum.numel()
        self.sum, self.sq, self.count = flat[:c], flat[c : 2 * c], flat[2 * c]


def _mean_var(m: _Moments) -> tuple[Tensor, Tensor]:
    n = m.count.clamp(min=1.0)
    mean = m.sum / n
    var = (m.sq / n - mean.square()).clamp(min=0.0)
    # unbiased, as BatchNorm stores its running variance
    return mean, var * n / (n - 1).clamp(min=1.0)


def _running_buffers(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor, Tensor]:
    """``(running_mean, running_var, num_batches_tracked)``, never None: every BatchNorm of LAST v2
    is built with the default ``track_running_stats=True``."""
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    return bn.running_mean, bn.running_var, bn.num_batches_tracked


def _pooled(parts: list[_Moments]) -> tuple[Tensor, Tensor]:
    total = _Moments(parts[0].sum.numel(), parts[0].sum.device)
    for p in parts:
        total.sum += p.sum
        total.sq += p.sq
        total.count += p.count
    return _mean_var(total)


@torch.no_grad()
def recompute_bn_stats(
    model: LASTv2,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    streams: Sequence[str],
    *,
    per_stream: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> int:
    """Replace the model's BatchNorm statistics by exact ones over ``batches``; returns the
    number of samples seen (on this rank). See the module docstring for what is set.

    ``batches`` yields dicts with one (B, 3, T, 25, M) tensor per stream name in ``streams``
    (DataLoader batches of the Dataset). Raises ValueError when it yields nothing.
    """
    bns = model.stream_bns()
    moments: dict[tuple[str, int], _Moments] = {}
    current = {"stream": 0}

    def hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def pre(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            key = (name, current["stream"])
            if key not in moments:
                moments[key] = _Moments(inputs[0].shape[1], device)
            moments[key].add(inputs[0])

        return pre

    targets: dict[str, nn.BatchNorm2d] = {
        f"data_bn.{k}": cast(nn.BatchNorm2d, bn) for k, bn in enumerate(model.data_bn)
    }
    targets.update(bns)
    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in targets.items()]
    was_training = model.training
    saved_tracked = {name: _running_buffers(mod)[2].clone() for name, mod in targets.items()}
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()  # dropout off: statistics of the network evaluation will run
    seen = 0
    try:
        for batch in batches:
            for name in streams:
                current["stream"] = STREAM_ORDER.index(name) if name in STREAM_ORDER else 0
                x = batch[name].to(device, non_blocking=True)
                with autocast() if autocast else contextlib.nullcontext():
                    model({name: x})  # one stream per pass: its own batch in every BatchNorm
            seen += int(batch[streams[0]].shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        keys = sorted(moments)
        flat = torch.cat([moments[key].flat() for key in keys])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for key in keys:
            size = moments[key].flat().numel()
            moments[key].load_flat(flat[offset : offset + size])
            offset += size
    if not moments:
        raise ValueError("no batches to recompute BatchNorm statistics from")

    used = sorted({STREAM_ORDER.index(s) if s in STREAM_ORDER else 0 for s in streams})
    for name, mod in targets.items():
        parts = [moments[(name, k)] for k in used if (name, k) in moments]
        if not parts:
            continue  # an input BatchNorm of a stream that is not configured: left as it is
        mean, var = _pooled(parts)
        running_mean, running_var, tracked = _running_buffers(mod)
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))
        tracked.copy_(saved_tracked[name])
    if per_stream:
        stats: dict[str, Tensor] = {}
        for prefix, bn in bns.items():
            pooled_mean, pooled_var = bn.running_mean.double(), bn.running_var.double()
            means, variances = [], []
            for k in range(len(STREAM_ORDER)):
                if (prefix, k) in moments:
                    mean, var = _mean_var(moments[(prefix, k)])
                else:  # stream not trained on: the pooled statistics
                    mean, var = pooled_mean, pooled_var
                means.append(mean)
                variances.append(var)
            stats[f"{prefix}.stream_mean"] = torch.stack(means).float()
            stats[f"{prefix}.stream_var"] = torch.stack(variances).float()
        model.set_stream_bn_stats(stats)
    else:
        model.set_stream_bn_stats(None)
    return seen


__all__ = ["BN_MODES", "recompute_bn_stats"]
