"""Evaluation of a student: accuracy metrics, object-interaction classes, noise robustness.

Metrics are computed from predictions (log-probabilities and labels as numpy arrays), so the same
code serves the single-process loop and DDP (where rank 0 gathers the predictions first).

Noisy skeletons. Three corruptions model what a real skeleton tracker does wrong:

* ``jitter``: Gaussian noise of the given std (normalised skeleton units) on every joint
  coordinate of every present body;
* ``joint_drop``: each joint of each present body is missing (all zero) for the whole clip with
  the given probability;
* ``frame_drop``: each frame after the first is lost with the given probability and the tracker
  holds the last good frame instead.

Jitter and joint dropout are applied to the **joint** stream and carried into the other streams
as the streams are defined: the bone stream is frame-local and linear in the joints, so
``bone' = bone + B(joint') - B(joint)`` with B the parent difference (the parents of the
configured streams mode) is exactly the bone stream of the corrupted joints; velocity gets the
frame difference of the jitter (``velocity + D(noise)``; the last frame, whose successor lies
outside the crop, keeps its clean value), and a missing joint has zero velocity. Frame drops are
applied to every stream consistently: each stream holds its last good frame, and the velocity of
a held frame is zero (a frozen tracker reports no motion). If the batch carries no joint stream
(a velocity/bone-only config), the same pattern (same noise tensor, same missing joints, same
held frames) is applied to every stream as it is. Noise is drawn per sample from ``(seed, sample
index, corruption)``, so results do not depend on batch size, worker count or DDP sharding.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

# 0-based NTU60 indices (action number A### minus 1) of the classes that involve an object.
# NTU120 keeps the NTU60 classes at the same indices, so the list applies to both.
OBJECT_CLASSES_NTU60: tuple[int, ...] = (
    0,  # A001 drink water
    1,  # A002 eat meal/snack
    2,  # A003 brushing teeth
    3,  # A004 brushing hair
    4,  # A005 drop
    5,  # A006 pickup
    6,  # A007 throw
    10,  # A011 reading
    11,  # A012 writing
    12,  # A013 tear up paper
    13,  # A014 wear jacket
    14,  # A015 take off jacket
    15,  # A016 wear a shoe
    16,  # A017 take off a shoe
    17,  # A018 wear on glasses
    18,  # A019 take off glasses
    19,  # A020 put on a hat/cap
    20,  # A021 take off a hat/cap
    27,  # A028 make a phone call/answer phone
    28,  # A029 playing with phone/tablet
    29,  # A030 typing on a keyboard
    31,  # A032 taking a selfie
)

# Default parents for the bone stream (last_v2.md section 7.3, the reference streams); callers
# pass the parents of the streams mode they trained with.
BONE_PARENTS: tuple[int, ...] = (0, 0, 20, 2, 20, 4, 5, 6, 20, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18, 1, 7, 6, 11, 10)

CORRUPTIONS = ("jitter", "joint_drop", "frame_drop")
MAX_LABEL_MAP_BYTES = 1 << 20


class EvaluationError(ValueError):
    """Inputs to evaluation that do not fit together (shapes, label map, class count)."""


class ClassAccuracy(TypedDict):
    """One entry of the metrics' ``per_class`` list."""

    index: int
    name: str
    count: int
    accuracy: float | None  # None for a class without validation samples


# --------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------
def load_label_map(path: Path | str) -> list[str]:
    """Class names, one per non-empty line of a UTF-8 text file (index = line order)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: label map not found")
    if path.stat().st_size > MAX_LABEL_MAP_BYTES:
        raise EvaluationError(f"{path}: label map larger than {MAX_LABEL_MAP_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvaluationError(f"{path}: label map is not UTF-8 text") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise EvaluationError(f"{path}: label map is empty")
    return names


def class_names(num_classes: int, label_map: Path | str | None = None) -> list[str]:
    """Names for ``num_classes`` classes: from the label map when given, else ``A001``..."""
    if label_map is None:
        return [f"A{i + 1:03d}" for i in range(num_classes)]
    names = load_label_map(label_map)
    if len(names) < num_classes:
        raise EvaluationError(f"{label_map}: label map has {len(names)} names, the model has {num_classes} classes")
    return names[:num_classes]


def object_classes(num_classes: int) -> tuple[int, ...]:
    """Object-interaction classes valid for a model with ``num_classes`` outputs (NTU numbering)."""
    return tuple(i for i in OBJECT_CLASSES_NTU60 if i < num_classes) if num_classes >= 60 else ()


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def _check_predictions(logprob: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logprob = np.asarray(logprob, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logprob.ndim != 2 or labels.ndim != 1 or logprob.shape[0] != labels.shape[0]:
        raise EvaluationError(f"predictions {logprob.shape} do not match labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logprob.shape[1]):
        raise EvaluationError(f"labels outside [0, {logprob.shape[1]})")
    if not np.isfinite(logprob).all():
        raise EvaluationError("predictions contain NaN or infinity")
    return logprob, labels


def topk_accuracy(logprob: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the k highest scores (0.0 for no samples)."""
    logprob, labels = _check_predictions(logprob, labels)
    if labels.size == 0:
        return 0.0
    k = min(k, logprob.shape[1])
    # argsort on -score with a stable sort: ties are broken towards the lower class index.
    top = np.argsort(-logprob, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def compute_metrics(
    logprob: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] | None = None,
    objects: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Top-1/top-5, mean NLL, per-class accuracy, confusion matrix and the object/non-object split.

    ``per_class[i]['accuracy']`` is None for a class without validation samples; the object split
    reports accuracy over the samples whose true class is (not) an object-interaction class.
    """
    logprob, labels = _check_predictions(logprob, labels)
    n, c = logprob.shape
    names = list(names) if names is not None else [f"A{i + 1:03d}" for i in range(c)]
    if len(names) != c:
        raise EvaluationError(f"{len(names)} class names for {c} classes")
    objects = tuple(object_classes(c) if objects is None else objects)
    pred = np.argmax(logprob, axis=1)
    correct = pred == labels
    cm = confusion_matrix(pred, labels, c)
    counts = cm.sum(axis=1)
    per_class: list[ClassAccuracy] = [
        {
            "index": i,
            "name": names[i],
            "count": int(counts[i]),
            "accuracy": float(cm[i, i] / counts[i]) if counts[i] else None,
        }
        for i in range(c)
    ]
    is_object = np.isin(labels, np.asarray(objects, dtype=np.int64))

    def _subset(mask: np.ndarray) -> dict[str, Any]:
        return {"count": int(mask.sum()), "top1": float(correct[mask].mean()) if mask.any() else None}

    present = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    return {
        "num_samples": int(n),
        "top1": float(correct.mean()) if n else 0.0,
        "top5": topk_accuracy(logprob, labels, 5),
        "nll": float(-logprob[np.arange(n), labels].mean()) if n else 0.0,
        "mean_class_accuracy": float(np.mean(present)) if present else 0.0,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "object_classes": {"classes": list(objects), **_subset(is_object)},
        "non_object_classes": _subset(~is_object),
    }


# --------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corruption:
    """One noise setting: ``kind`` in CORRUPTIONS and its level (std or probability)."""

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTIONS:
            raise EvaluationError(f"unknown corruption {self.kind!r}; expected one of {CORRUPTIONS}")
        if not 0 <= self.level <= 10 or (self.kind != "jitter" and self.level >= 1):
            raise EvaluationError(f"corruption level {self.level} out of range for {self.kind}")

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.level:g}"


def _frame_diff(x: Tensor) -> Tensor:
    out = torch.zeros_like(x)
    out[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    return out


def _bone(x: Tensor, parents: Sequence[int]) -> Tensor:
    return x - x[:, :, :, list(parents)]


def _sample_generator(seed: int, index: int, corruption: Corruption) -> torch.Generator:
    tag = zlib.crc32(corruption.key.encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + tag) % (2**63 - 1))


def corrupt_streams(
    streams: dict[str, Tensor],
    indices: Tensor | Sequence[int],
    corruption: Corruption,
    seed: int,
    bone_parents: Sequence[int] = BONE_PARENTS,
) -> dict[str, Tensor]:
    """Apply ``corruption`` to a batch of streams (each (B, 3, T, 25, M)); see the module docstring.

    Returns new tensors (inputs are not modified). Deterministic per (seed, sample index).
    """
    if not streams:
        raise EvaluationError("no streams to corrupt")
    first = next(iter(streams.values()))
    if first.dim() != 5 or first.shape[3] != len(bone_parents):
        raise EvaluationError(f"streams must be (B, 3, T, 25, M), got {tuple(first.shape)}")
    b, c, t, v, m = first.shape
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    if len(idx) != b:
        raise EvaluationError(f"{len(idx)} sample indices for a batch of {b}")
    ref = streams.get("joint", first)
    present = (ref.abs().amax(dim=(1, 2, 3)) > 0).to(ref.dtype)  # (B, M): absent bodies stay zero

    noise = torch.zeros(b, c, t, v, m)
    keep = torch.ones(b, 1, 1, v, m)
    src = torch.arange(t).repeat(b, 1)  # frame held at each position
    for row, sample in enumerate(idx):
        g = _sample_generator(seed, sample, corruption)
        if corruption.kind == "jitter":
            noise[row] = torch.randn(c, t, v, m, generator=g) * corruption.level
        elif corruption.kind == "joint_drop":
            keep[row, 0, 0] = (torch.rand(v, m, generator=g) >= corruption.level).float()
        else:
            lost = torch.rand(t, generator=g) < corruption.level
            lost[0] = False
            kept_at = torch.where(lost, torch.zeros(t, dtype=torch.long), torch.arange(t))
            src[row] = torch.cummax(kept_at, dim=0).values
    device, dtype = ref.device, ref.dtype
    noise = noise.to(device, dtype) * present[:, None, None, None, :]
    keep = keep.to(device, dtype)
    keep = keep * present[:, None, None, None, :] + (1 - present[:, None, None, None, :])
    src = src.to(device)

    def _apply(x: Tensor) -> Tensor:
        if corruption.kind == "jitter":
            return x + noise
        if corruption.kind == "joint_drop":
            return x * keep
        gather = src[:, None, :, None, None].expand_as(x)
        return torch.gather(x, 2, gather)

    if "joint" not in streams:
        return {name: _apply(x) for name, x in streams.items()}
    joint = streams["joint"]
    out: dict[str, Tensor] = {}
    if corruption.kind == "frame_drop":
        held = (src != torch.arange(t, device=device)).to(dtype)[:, None, :, None, None]
        for name, x in streams.items():
            y = _apply(x)
            out[name] = y * (1 - held) if name == "velocity" else y
        return out
    new_joint = _apply(joint)
    for name, x in streams.items():
        if name == "joint":
            out[name] = new_joint
        elif name == "velocity" and corruption.kind == "jitter":
            y = x + _frame_diff(noise)
            y[:, :, -1] = x[:, :, -1]
            out[name] = y
        elif name == "bone":
            out[name] = x + _bone(new_joint, bone_parents) - _bone(joint, bone_parents)
        else:  # velocity under joint drop, and any other stream
            out[name] = _apply(x)
    return out


# --------------------------------------------------------------------------------------------
# running a model
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    streams: Sequence[str],
    *,
    corruption: Corruption | None = None,
    noise_seed: int = 0,
    bone_parents: Sequence[int] = BONE_PARENTS,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-probs (N, C) float32, labels (N,), dataset indices (N,)) over ``loader`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    outs, labels, indices = [], [], []
    try:
        for batch in loader:
            x = {s: batch[s] for s in streams}
            idx = batch["index"]
            if corruption is not None:
                x = corrupt_streams(x, idx, corruption, noise_seed, bone_parents)
            x = {s: t.to(device, non_blocking=True) for s, t in x.items()}
            with autocast() if autocast else contextlib.nullcontext():
                out = model(x)
            outs.append(out.float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long().cpu())
            indices.append(torch.as_tensor(idx).long().cpu())
    finally:
        model.train(was_training)
    if not outs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()


def corruptions_from(
    jitter_stds: Iterable[float], joint_drop_probs: Iterable[float], frame_drop_probs: Iterable[float]
) -> list[Corruption]:
    """The configured corruption levels as a flat list (zero levels skipped: that is the clean run)."""
    out = [Corruption("jitter", s) for s in jitter_stds if s > 0]
    out += [Corruption("joint_drop", p) for p in joint_drop_probs if p > 0]
    out += [Corruption("frame_drop", p) for p in frame_drop_probs if p > 0]
    return out


def robustness_summary(clean_top1: float, noisy_top1: dict[str, float]) -> dict[str, Any]:
    """Accuracy per corruption and the drop relative to the clean accuracy."""
    return {key: {"top1": acc, "drop": clean_top1 - acc} for key, acc in noisy_top1.items()}


def evaluate_model(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    streams: Sequence[str],
    *,
    names: Sequence[str],
    corruptions: Sequence[Corruption] = (),
    noise_seed: int = 0,
    bone_parents: Sequence[int] = BONE_PARENTS,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """Full single-process evaluation: :func:`compute_metrics` on clean data plus top-1 under each
    corruption (``metrics['robustness']``)."""
    logprob, labels, _ = predict(model, loader, device, streams, autocast=autocast)
    metrics = compute_metrics(logprob, labels, names)
    noisy = {}
    for corr in corruptions:
        lp, lb, _ = predict(
            model,
            loader,
            device,
            streams,
            corruption=corr,
            noise_seed=noise_seed,
            bone_parents=bone_parents,
            autocast=autocast,
        )
        noisy[corr.key] = compute_metrics(lp, lb, names)["top1"]
    metrics["robustness"] = robustness_summary(metrics["top1"], noisy)
    return metrics
