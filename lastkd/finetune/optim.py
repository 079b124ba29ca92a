"""The official fine-tuning optimiser pieces: layer-wise lr decay groups, warmup + cosine, mixup/cutmix.

Layer ids follow the official ``get_num_layer_for_vit``: the patch embedding (and position table)
is layer 0, block i is layer i + 1, everything after the blocks (``fc_norm``, the head) is layer
depth + 1. A parameter of layer l trains at ``lr * layer_decay ** (depth + 1 - l)``, so the head
gets the full rate and the patch embedding ``layer_decay ** (depth + 1)`` of it. Biases, norms
(every 1-d tensor) and the position table get no weight decay.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

__all__ = ["layer_id", "lr_at", "mix_batch", "param_groups", "soft_cross_entropy"]

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def layer_id(name: str, depth: int) -> int:
    """The official layer index of parameter ``name`` in a ViT of ``depth`` blocks."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (layer, decay or not), each with its ``lr_scale``."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(".bias") and not name.startswith(NO_DECAY_NAMES)
        layer = layer_id(name, depth)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "layer": layer,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cosine down to ``floor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows summing to 1), averaged over the batch."""
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mix_batch(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup: float,
    cutmix: float,
    switch_prob: float,
    smoothing: float,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix a video batch ``(B, C, T, H, W)`` with its flipped self (timm's batch mode,
    the cutmix box cut through every frame); returns the mixed batch and smoothed soft targets."""
    off = smoothing / num_classes
    onehot = torch.full((len(labels), num_classes), off, device=x.device)
    onehot.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
    if mixup <= 0 and cutmix <= 0:
        return x, onehot
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = rng.betavariate(alpha, alpha)
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = rng.randint(0, h - 1), rng.randint(0, w - 1)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        x = x * lam + flipped * (1 - lam)
    return x, onehot * lam + onehot.flip(0) * (1 - lam)
