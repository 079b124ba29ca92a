"""Feature distillation from stored teacher embeddings into the LAST v2 student.

The student's pooled feature (`LASTv2.forward_with_features`) goes through a training-only
`Projector` into the teacher's feature space, and is pulled towards the teacher vector read from
a feature set. The total objective is ``L = (1 - a) * CE + a * D`` with ``a`` following a schedule
over training progress; samples whose clip has no teacher feature only contribute to CE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from lastkd.validation import StrictModel

Schedule = Literal["constant", "linear", "cosine"]
DistillLossKind = Literal["mse", "cosine"]
TeacherNorm = Literal["none", "l2", "standardize"]
# 'shuffled' is the control arm of an experiment: teacher vectors permuted across clips (fixed by
# the seed), so any gain that survives it is not due to the teacher knowing the clip.
TeacherOrder = Literal["joined", "shuffled"]
# What a flipped (time-reversed) training sample does with the teacher vector of its clip, which
# was computed on the clip played forwards: 'skip' leaves it out of the distillation term (its
# cross-entropy term stays); 'reuse' pulls it towards the forward clip's vector anyway.
FlippedViews = Literal["skip", "reuse"]

_EPS = 1e-6


class DistillConfig(StrictModel):
    """Distillation settings (part of TrainConfig). ``feature_set=None`` switches distillation off.

    ``alpha`` is the weight of the distillation term; it moves from ``alpha_start`` (progress 0)
    to ``alpha_end`` (progress 1) along ``schedule`` ('constant' uses ``alpha_start`` throughout).
    """

    alpha_start: float = Field(0.5, ge=0.0, le=1.0)
    alpha_end: float = Field(0.0, ge=0.0, le=1.0)
    schedule: Schedule = "linear"
    loss: DistillLossKind = "cosine"
    teacher_norm: TeacherNorm = "none"
    projector_hidden: int = Field(512, ge=1, le=16384)
    feature_set: str | None = Field(None, min_length=1, max_length=256)
    teacher_order: TeacherOrder = Field(
        "joined",
        description="'joined': each clip gets its own teacher vector; 'shuffled': vectors permuted across "
        "clips at load time (a control that must do worse whenever the teacher is informative).",
    )
    flipped_views: FlippedViews = Field(
        "skip",
        description="A sample flipped by augmentation is time-reversed, but its teacher vector was computed on "
        "the forward clip: 'skip' leaves flipped samples out of the distillation term (CE only), 'reuse' "
        "distils them towards the forward vector anyway (the mismatch of cached-feature training).",
    )

    @field_validator("feature_set")
    @classmethod
    def _clean_feature_set(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or any(ch.isspace() or not ch.isprintable() for ch in value)):
            raise ValueError("feature_set must be a feature-set id without whitespace or control characters")
        return value

    @property
    def enabled(self) -> bool:
        """True when a feature set is named and the schedule gives the distillation term any weight."""
        if self.feature_set is None:
            return False
        if self.schedule == "constant":
            return self.alpha_start > 0
        return self.alpha_start > 0 or self.alpha_end > 0


def alpha_at(cfg: DistillConfig, progress: float) -> float:
    """Distillation weight at training ``progress`` in [0, 1] (values outside are clamped).

    Returns 0.0 whenever distillation is not enabled, so callers can use it unconditionally.
    """
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not math.isfinite(progress):
        raise ValueError(f"progress must be a finite number, got {progress!r}")
    if not cfg.enabled:
        return 0.0
    p = min(1.0, max(0.0, float(progress)))
    a0, a1 = cfg.alpha_start, cfg.alpha_end
    if cfg.schedule == "constant":
        return a0
    if cfg.schedule == "linear":
        return a0 + (a1 - a0) * p
    return a1 + (a0 - a1) * 0.5 * (1.0 + math.cos(math.pi * p))


class Projector(nn.Module):
    """Training-only MLP from the student feature space to the teacher's: Linear-GELU-Linear.

    No BatchNorm on purpose: the projection of one sample must not depend on the rest of the
    batch (batches of one, samples without a teacher vector, uneven DDP shards).
    """

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int = 512) -> None:
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
                raise ValueError(f"Projector {name} must be an int in [1, 65536], got {value!r}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.net = nn.Sequential(nn.Linear(student_dim, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.student_dim:
            raise ValueError(f"Projector expects (N, {self.student_dim}) features, got {tuple(x.shape)}")
        return self.net(x)


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension mean and standard deviation of a teacher feature set, float32 (D,)."""

    mean: Tensor
    std: Tensor


def feature_stats(array: np.ndarray | Tensor) -> FeatureStats:
    """Mean and (population) std over rows of an (n, D) feature array, computed in float64.

    The std is floored at 1e-6 so constant dimensions cannot cause a division by zero later.
    """
    arr = array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"feature_stats expects a non-empty (n, D) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"feature_stats expects a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("feature_stats: the feature array contains NaN or infinite values")
    mean = arr.mean(axis=0)
    std = np.maximum(arr.std(axis=0), _EPS)
    return FeatureStats(torch.from_numpy(mean).float(), torch.from_numpy(std).float())


def _normalise_teacher(teacher: Tensor, cfg: DistillConfig, stats: FeatureStats | None) -> Tensor:
    if cfg.teacher_norm == "l2":
        return F.normalize(teacher, p=2.0, dim=1, eps=_EPS)
    if cfg.teacher_norm == "standardize":
        if stats is None:
            raise ValueError("teacher_norm='standardize' needs FeatureStats of the feature set (stats=None given)")
        if stats.mean.shape != (teacher.shape[1],) or stats.std.shape != (teacher.shape[1],):
            raise ValueError(
                f"FeatureStats have shapes {tuple(stats.mean.shape)}/{tuple(stats.std.shape)}, "
                f"teacher features have dim {teacher.shape[1]}"
            )
        mean = stats.mean.to(device=teacher.device, dtype=teacher.dtype)
        std = stats.std.to(device=teacher.device, dtype=teacher.dtype).clamp(min=_EPS)
        return (teacher - mean) / std
    return teacher


def distill_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    has_teacher_mask: Tensor,
    cfg: DistillConfig,
    stats: FeatureStats | None = None,
) -> Tensor:
    """Masked mean over samples of the per-sample distance between (projected) student and teacher.

    ``student_feat`` and ``teacher_feat`` are (N, D) (teacher may be float16 from the store);
    ``has_teacher_mask`` is bool (N,). Per sample: mean squared error over dims ('mse') or
    ``1 - cosine`` ('cosine'), after normalising the teacher per ``cfg.teacher_norm``. Rows without
    a teacher vector are ignored entirely (their content, even NaN, does not matter); if no row has
    one the result is an exact 0 that still carries the graph. No host synchronisation.
    """
    if student_feat.dim() != 2:
        raise ValueError(f"student features must be (N, D), got {tuple(student_feat.shape)}")
    if teacher_feat.shape != student_feat.shape:
        raise ValueError(
            f"teacher features {tuple(teacher_feat.shape)} do not match student features {tuple(student_feat.shape)}"
        )
    if has_teacher_mask.dtype != torch.bool or has_teacher_mask.shape != (student_feat.shape[0],):
        raise ValueError(
            f"has_teacher_mask must be bool of shape ({student_feat.shape[0]},), "
            f"got {has_teacher_mask.dtype} {tuple(has_teacher_mask.shape)}"
        )
    mask = has_teacher_mask.to(student_feat.device)
    teacher = teacher_feat.to(device=student_feat.device, dtype=student_feat.dtype).detach()
    # Zero the rows without a teacher *before* any arithmetic so garbage there cannot leak NaN
    # into the loss or its gradient.
    teacher = torch.where(mask[:, None], teacher, torch.zeros_like(teacher))
    teacher = _normalise_teacher(teacher, cfg, stats)
    if cfg.loss == "mse":
        per_sample = (student_feat - teacher).pow(2).mean(dim=1)
    else:
        per_sample = 1.0 - F.cosine_similarity(student_feat, teacher, dim=1, eps=1e-8)
    per_sample = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum() / mask.sum().clamp(min=1).to(per_sample.dtype)


def label_smoothed_nll(logprob: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Reference LAST v2 loss on log-probabilities: ``(1-s) * -logp[y] + s * mean_c(-logp[c])``."""
    if logprob.dim() != 2:
        raise ValueError(f"logprob must be (N, classes), got {tuple(logprob.shape)}")
    if target.shape != (logprob.shape[0],) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"target must be int64 of shape ({logprob.shape[0]},), got {target.dtype} {tuple(target.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    nll = -logprob.gather(1, target.long().unsqueeze(1)).squeeze(1)
    smooth = -logprob.mean(dim=1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


def smoothed_ce_floor(label_smoothing: float, num_classes: int) -> float:
    """The lowest value :func:`label_smoothed_nll` can reach with ``num_classes`` outputs: the
    entropy of the smoothed target. Smoothing 0.1 floors CE at ~0.72 with 60 classes, ~0.39 with 5."""
    s, c = float(label_smoothing), int(num_classes)
    if s == 0.0 or c < 2:
        return 0.0
    hit = 1.0 - s + s / c
    miss = s / c
    return float(-(hit * math.log(hit) + (c - 1) * miss * math.log(miss)))


def total_loss(
    logprob: Tensor,
    target: Tensor,
    label_smoothing: float,
    student_feat: Tensor | None,
    teacher: Tensor | None,
    mask: Tensor | None,
    alpha: float,
    projector: nn.Module | None,
    cfg: DistillConfig,
    stats: FeatureStats | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``L = (1 - a) * CE + a * D`` and its parts.

    CE is the label-smoothed NLL on the model's log-probabilities. With ``alpha == 0`` the
    projector is not run at all and the teacher arguments may be None. A batch in which no sample
    has a teacher vector falls back to pure CE (the effective alpha is 0 for that batch; computed
    on-device, no host sync). ``parts`` holds detached 0-d tensors ``ce``, ``distill``, ``total``
    and ``alpha_effective``, plus the float ``alpha``.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    ce = label_smoothed_nll(logprob, target, label_smoothing)
    if alpha == 0.0:
        zero = ce.new_zeros(())
        return ce, {
            "ce": ce.detach(),
            "distill": zero,
            "total": ce.detach(),
            "alpha": 0.0,
            "alpha_effective": zero,
        }
    if student_feat is None or teacher is None or mask is None or projector is None:
        raise ValueError("alpha > 0 needs student_feat, teacher, mask and projector")
    d = distill_loss(projector(student_feat), teacher, mask, cfg, stats)
    a_eff = mask.to(ce.device).any().to(ce.dtype) * float(alpha)
    loss = (1.0 - a_eff) * ce + a_eff * d
    return loss, {
        "ce": ce.detach(),
        "distill": d.detach(),
        "total": loss.detach(),
        "alpha": float(alpha),
        "alpha_effective": a_eff.detach(),
    }


__all__ = [
    "DistillConfig",
    "FeatureStats",
    "Projector",
    "TeacherOrder",
    "alpha_at",
    "distill_loss",
    "feature_stats",
    "label_smoothed_nll",
    "smoothed_ce_floor",
    "total_loss",
]
