"""Data for the experiment tests: a synthetic skeleton set and a teacher feature set that carries
class information (each clip's vector is its class's one-hot pattern plus noise), written into a
real LMDB feature store.

With such a teacher, a student that sees the correct (joined) vector can learn to predict it
from the skeleton; with the vectors shuffled across clips it can only learn their mean, so its
distillation loss must stay clearly higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INFORMATIVE_DIM = 16


@dataclass(frozen=True)
class InformativeData:
    """A synthetic dataset plus a class-informative feature set covering all of its clips."""

    skeletons: Path
    store_path: Path
    feature_set: str
    names: list[str]
    labels: list[int]


def class_vectors(labels: list[int], dim: int = INFORMATIVE_DIM, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n, dim) float32: a fixed random unit pattern per class plus Gaussian noise per clip."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((max(labels) + 1, dim))
    patterns /= np.linalg.norm(patterns, axis=1, keepdims=True)
    vecs = patterns[np.asarray(labels)] + noise * rng.standard_normal((len(labels), dim))
    return vecs.astype(np.float32)


def make_informative_data(base: Path, classes: int = 3, per_class: int = 8, seed: int = 0) -> InformativeData:
    """Generate ``base/synth`` and ``base/features.lmdb`` (one class-informative vector per clip)."""
    from lastkd.featurestore import FeatureStore
    from lastkd.student.synth import generate

    result = generate(base / "synth", classes=classes, samples_per_class=per_class, frames=40, video=False, seed=seed)
    store_path = base / "features.lmdb"
    store = FeatureStore(store_path, map_size=32 << 20)
    try:
        meta = store.create_set(
            teacher="videomae_v2_vit_b",
            weights_sha256=None,
            preprocessing={"test": "informative"},
            dim=INFORMATIVE_DIM,
            dtype="float16",
        )
        store.put_many(meta.set_id, result.names, class_vectors(result.labels).astype(np.float16))
    finally:
        store.close()
    return InformativeData(result.skeleton_dir, store_path, meta.set_id, list(result.names), list(result.labels))


def experiment_base(informative: InformativeData, **overrides: Any) -> dict[str, Any]:
    """A TrainConfig mapping for a short distillation run on ``informative`` (nested overrides merge)."""
    data = informative
    # A recipe that learns the informative teacher within 16 full-batch steps (joint stream only,
    # to stay cheap on CPU): measured final distillation loss 0.38 joined vs 0.79 shuffled.
    raw: dict[str, Any] = {
        "name": "exp",
        "data": {"path": str(data.skeletons), "num_frames": 8, "split": "xsub", "streams": ["joint"]},
        "epochs": 16,
        "batch_size": 12,
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "distill": {
            "feature_set": data.feature_set,
            "alpha_start": 0.9,
            "schedule": "constant",
            "loss": "cosine",
            "projector_hidden": 32,
            "teacher_norm": "standardize",
        },
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        "device": "cpu",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw
