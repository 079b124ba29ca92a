"""The torch Dataset of MIB streams, joined with stored teacher features by sample name.

Streams are computed lazily per item from the raw coordinates of the collection (which may be a
read-only memmap): normalisation parameters come from one cheap pass over the sample's own
frames, and the (expensive part of the) work is done on the ``num_frames`` sampled frames only in
``standard`` mode. Nothing of size N x T x 25 x 2 is precomputed, so building a Dataset is instant
and memory stays at the collection's footprint. Teacher features are read from the feature store
once, at build time, into one float32 array.

Augmentation randomness is a function of (seed, epoch, index) only, so items are the same with
any number of DataLoader workers; ``set_epoch`` writes to a shared-memory tensor that workers
(persistent or not) read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from lastkd.featurestore import FeatureStore, FeatureStoreError
from lastkd.student.data import augment as aug
from lastkd.student.data import streams as st
from lastkd.student.data.collection import SkeletonCollection
from lastkd.student.data.config import DataConfig
from lastkd.student.distill import FlippedViews, TeacherOrder

# Mixed into the shuffle seed so the permutation is not correlated with any other draw of the seed.
_SHUFFLE_SALT = 0x7EAC5EED


class DatasetError(ValueError):
    """A collection, feature store or argument that cannot form a dataset."""


# ------------------------------------------------------------------------------------------------
# Teacher features
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """How many samples have a teacher feature."""

    found: int
    total: int

    @property
    def fraction(self) -> float:
        """found / total (0.0 for an empty list)."""
        return self.found / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.found}/{self.total} ({100 * self.fraction:.1f}%)"


class TeacherFeatures:
    """Teacher vectors aligned with a list of sample names (zeros and ``found`` False where missing)."""

    def __init__(self, names: Sequence[str], vectors: np.ndarray, found: np.ndarray, feature_set: str) -> None:
        vectors = np.asarray(vectors)
        found = np.asarray(found, dtype=bool)
        if vectors.ndim != 2 or vectors.shape[0] != len(names) or found.shape != (len(names),):
            raise DatasetError(f"teacher vectors {vectors.shape} / found {found.shape} do not match {len(names)} names")
        vectors = vectors.astype(np.float32)
        vectors[~found] = 0.0
        bad = found & ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            examples = [names[i] for i in np.flatnonzero(bad)[:5]]
            raise DatasetError(
                f"feature set {feature_set!r} holds non-finite vectors for {int(bad.sum())} samples, e.g. {examples}"
            )
        self.names = list(names)
        self.vectors = vectors
        self.found = found
        self.feature_set = feature_set

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.vectors.shape[1])

    @property
    def coverage(self) -> Coverage:
        """How many of the names have a vector."""
        return Coverage(int(self.found.sum()), len(self.names))

    def stats(self, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float32 (D,) over the covered rows, for teacher-feature standardisation.

        ``std`` is floored at ``eps`` so dividing by it is always safe. Raises when nothing is covered.
        """
        rows = self.vectors[self.found].astype(np.float64)
        if rows.shape[0] == 0:
            raise DatasetError(f"feature set {self.feature_set!r} covers none of the {len(self.names)} samples")
        return rows.mean(axis=0).astype(np.float32), np.maximum(rows.std(axis=0), eps).astype(np.float32)

    def shuffled(self, seed: int) -> TeacherFeatures:
        """The control arm's features: the covered vectors permuted among the covered clips.

        The permutation is a function of ``seed`` only (same seed, same permutation, in every arm
        and on every DDP rank); clips without a vector keep none, so coverage is unchanged.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"seed must be a non-negative int, got {seed!r}")
        rows = np.flatnonzero(self.found)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, _SHUFFLE_SALT))))
        vectors = self.vectors.copy()
        vectors[rows] = self.vectors[rows[rng.permutation(len(rows))]]
        return TeacherFeatures(self.names, vectors, self.found.copy(), self.feature_set)

    @classmethod
    def from_store(cls, store_path: str | os.PathLike[str], feature_set: str, names: Sequence[str]) -> TeacherFeatures:
        """Read the vectors of ``names`` from ``feature_set`` in the store at ``store_path`` (one batch read)."""
        path = Path(store_path)
        if not path.exists():
            raise DatasetError(f"teacher feature store {path} does not exist")
        if not isinstance(feature_set, str) or not feature_set:
            raise DatasetError(f"feature_set must be a non-empty string, got {feature_set!r}")
        try:
            store = FeatureStore(path, readonly=True)
        except FeatureStoreError as exc:
            raise DatasetError(f"cannot open teacher feature store {path}: {exc}") from exc
        try:
            available = sorted(meta.set_id for meta in store.list_sets())
            if feature_set not in available:
                raise DatasetError(
                    f"feature set {feature_set!r} is not in the store {path}; available: {available or 'none'}"
                )
            if names:
                vectors, found = store.get_many(feature_set, list(names))
            else:
                vectors, found = np.zeros((0, store.get_set(feature_set).dim), np.float32), np.zeros(0, bool)
        except FeatureStoreError as exc:
            raise DatasetError(f"cannot read teacher features from {path}: {exc}") from exc
        finally:
            store.close()
        return cls(names, vectors, found, feature_set)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------


class SkeletonDataset(Dataset):
    """MIB streams of one split: item = {stream: (3, T, 25, 2) float32, label, teacher, has_teacher, index}.

    ``train`` selects random temporal sampling plus augmentation (``cfg.augment``); otherwise items
    are deterministic. Collections with ready-made streams (LAST ``.npy``) are only sampled in time
    and augmented.
    """

    def __init__(
        self,
        collection: SkeletonCollection,
        cfg: DataConfig,
        train: bool,
        teacher: TeacherFeatures | None = None,
        seed: int = 0,
        flipped_views: FlippedViews = "skip",
    ) -> None:
        if not isinstance(collection, SkeletonCollection):
            raise DatasetError(f"collection must be a SkeletonCollection, got {type(collection).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise DatasetError(f"seed must be a non-negative int, got {seed!r}")
        self.collection = collection
        self.cfg = cfg
        self.train = bool(train)
        self.seed = seed
        self.teacher = teacher
        self.flipped_views = flipped_views
        ready = collection.streams or {}
        self._use_ready = bool(ready) and all(s in ready for s in cfg.streams)
        self._check_collection()
        if teacher is not None and teacher.names != collection.names:
            raise DatasetError("teacher features are not aligned with the collection's sample names")
        # Shared memory so DataLoader workers (forked or spawned, persistent or not) see set_epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def _check_collection(self) -> None:
        col, cfg = self.collection, self.cfg
        arrays: dict[str, np.ndarray]
        if self._use_ready and col.streams is not None:
            arrays = {k: col.streams[k] for k in cfg.streams}
        elif col.data is not None:
            arrays = {"data": col.data}
        else:
            have = sorted(col.streams or {})
            raise DatasetError(
                f"collection has ready-made streams {have} but no raw data; cfg.streams asks for {list(cfg.streams)}"
            )
        shapes = {k: a.shape for k, a in arrays.items()}
        for k, shape in shapes.items():
            if len(shape) != 5 or shape[1] != 3 or shape[3:] != (st.NUM_JOINTS, st.NUM_BODIES):
                raise DatasetError(f"{k} has shape {shape}, expected (N, 3, T, {st.NUM_JOINTS}, {st.NUM_BODIES})")
        if len(set(shapes.values())) != 1:
            raise DatasetError(f"ready-made streams differ in shape: {shapes}")
        t_stored = next(iter(shapes.values()))[2]
        lengths = col.lengths
        if len(col) and (lengths.min() < 0 or lengths.max() > t_stored):
            raise DatasetError(f"sample lengths must lie in [0, {t_stored}], got [{lengths.min()}, {lengths.max()}]")
        labels = col.labels
        if len(col) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            raise DatasetError(
                f"labels must lie in [0, {cfg.num_classes}) for {cfg.dataset}, got [{labels.min()}, {labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.collection)

    @property
    def epoch(self) -> int:
        """The epoch augmentation draws are made for."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of this epoch (call before iterating the DataLoader)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise DatasetError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> np.random.Generator:
        """The generator of one item in the current epoch: a function of (seed, epoch, index) only."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence((self.seed, self.epoch, index))))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        i = int(index) % n
        rng = self.rng(i) if self.train else None
        streams, flipped = self._sample(i, rng)
        item: dict[str, torch.Tensor | int] = {k: torch.from_numpy(streams[k]) for k in self.cfg.streams}
        item["label"] = torch.tensor(int(self.collection.labels[i]), dtype=torch.int64)
        if self.teacher is not None:
            item["teacher"] = torch.from_numpy(self.teacher.vectors[i].copy())
            # The stored vector is of the clip played forwards; a time-reversed view is another clip.
            mismatch = flipped and self.flipped_views == "skip"
            item["has_teacher"] = torch.tensor(bool(self.teacher.found[i]) and not mismatch)
        else:
            item["teacher"] = torch.zeros(0, dtype=torch.float32)
            item["has_teacher"] = torch.tensor(False)
        item["index"] = i
        return item

    # -- stream computation -------------------------------------------------------------------

    def sample_streams(self, i: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """The configured streams of sample ``i`` as contiguous float32 (3, num_frames, 25, 2) arrays."""
        return self._sample(i, rng)[0]

    def _sample(self, i: int, rng: np.random.Generator | None) -> tuple[dict[str, np.ndarray], bool]:
        """The streams of sample ``i`` and whether augmentation flipped (time-reversed) them."""
        if self._use_ready:
            out, flipped = self._from_ready(i, rng)
        elif self.cfg.streams_mode == "reference":
            out, flipped = self._reference(i, rng)
        else:
            out, flipped = self._standard(i, rng)
        return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in self.cfg.streams}, flipped

    def _augment(self, streams: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], bool]:
        # draw_params first, as aug.augment itself would: the same draws, and the flip is known
        params = aug.draw_params(rng, self.cfg.augment)
        return aug.augment(streams, rng, self.cfg.augment, params), self._flipped(params)

    def _flipped(self, params: aug.AugmentParams) -> bool:
        return bool(self.cfg.augment.flip and params.flip)

    def _window(self) -> tuple[float, float] | None:
        """The training window fraction range, or None (validation window) when the crop is off."""
        acfg = self.cfg.augment
        return acfg.time_crop_range if acfg.time_crop else None

    def _raw(self, i: int) -> np.ndarray:
        length = int(self.collection.lengths[i])
        data = self.collection.data
        assert data is not None, "raw sampling needs raw data (checked in _check_collection)"
        return np.asarray(data[i, :, :length], dtype=np.float32)

    def _reference(self, i: int, rng: np.random.Generator | None) -> tuple[dict[str, np.ndarray], bool]:
        coords = self._raw(i)
        if coords.shape[1] == 0:  # nothing recorded (the reference drops such samples): all zero
            coords = np.zeros((3, 1, st.NUM_JOINTS, st.NUM_BODIES), np.float32)
        t = self.cfg.num_frames
        start = st.reference_crop_start(st.REFERENCE_STORED_FRAMES, t, rng)
        if rng is not None and not self.cfg.augment.time_crop:  # drawn anyway: other draws unchanged
            start = st.reference_crop_start(st.REFERENCE_STORED_FRAMES, t, None)
        window = st.reference_window(coords, start, t)
        cropped: dict[str, np.ndarray] = {k: window[k] for k in self.cfg.streams}
        return (cropped, False) if rng is None else self._augment(cropped, rng)

    def _from_ready(self, i: int, rng: np.random.Generator | None) -> tuple[dict[str, np.ndarray], bool]:
        streams = self.collection.streams
        assert streams is not None, "ready-made sampling needs ready-made streams (checked in __init__)"
        ready: dict[str, np.ndarray] = {k: streams[k][i] for k in self.cfg.streams}
        if self.cfg.streams_mode == "reference":
            return self._crop_augment(ready, rng)
        # standard: sample the valid frames by nearest index (stored velocity is per stored frame)
        length = max(int(self.collection.lengths[i]), 1)
        positions, _ = st.standard_positions(0, length - 1, self.cfg.num_frames, rng, self._window())
        idx = np.rint(positions).astype(np.intp)
        sampled: dict[str, np.ndarray] = {k: np.asarray(v[:, idx], dtype=np.float32) for k, v in ready.items()}
        if "velocity" in sampled:  # stored per stored frame; standard velocity is per second
            sampled["velocity"] = sampled["velocity"] * np.float32(st.STANDARD_VELOCITY_SCALE)
        if rng is None:
            return sampled, False
        params = aug.draw_params(rng, self.cfg.augment)
        out = aug.transform(sampled, params, self.cfg.augment)
        if "velocity" in out and self._flipped(params):
            out["velocity"] = -out["velocity"]  # reversed time reverses motion
        out = aug.add_noise(out, rng, self.cfg.augment)
        return aug.drop_joints(out, params, self.cfg.augment), self._flipped(params)

    def _crop_augment(
        self, full: dict[str, np.ndarray], rng: np.random.Generator | None
    ) -> tuple[dict[str, np.ndarray], bool]:
        t = self.cfg.num_frames
        stored = next(iter(full.values())).shape[1]
        start = st.reference_crop_start(stored, t, rng)
        if rng is not None and not self.cfg.augment.time_crop:
            start = st.reference_crop_start(stored, t, None)
        cropped = {k: st.reference_crop(v, start, t) for k, v in full.items()}
        return (cropped, False) if rng is None else self._augment(cropped, rng)

    def _standard(self, i: int, rng: np.random.Generator | None) -> tuple[dict[str, np.ndarray], bool]:
        coords = self._raw(i)
        t = self.cfg.num_frames
        if coords.shape[1] == 0:
            zeros = np.zeros((3, t, st.NUM_JOINTS, st.NUM_BODIES), np.float32)
            return {k: zeros for k in self.cfg.streams}, False
        joint, present, step = st.standard_joint(coords, t, rng, window=self._window())
        if rng is None:
            return st.standard_streams(joint, present, step), False
        acfg = self.cfg.augment
        params = aug.draw_params(rng, acfg)
        # Augment the joints, then derive velocity and bone from them, so a flipped clip gets the
        # velocity of the reversed motion (spatial transforms commute with both anyway).
        joint = aug.apply_spatial(joint, aug.spatial_matrix(params, acfg))
        if self._flipped(params):
            joint, present = np.ascontiguousarray(joint[:, ::-1]), present[::-1]
        out = st.standard_streams(joint, present, step)
        out = aug.add_noise({k: out[k] for k in self.cfg.streams}, rng, acfg, present=present)
        return aug.drop_joints(out, params, acfg), self._flipped(params)


# ------------------------------------------------------------------------------------------------
# Building both splits
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataInfo:
    """Facts about the built datasets, for logs, job metrics and the published model card.

    ``coverage_*`` are fractions of samples with a teacher feature (0.0 without a store);
    ``feature_dim`` is 0 without a store; ``data_hash`` fingerprints sources + stream settings.
    ``skipped`` counts the source files (or stored samples) the readers skipped as unusable and
    ``skipped_first`` gives the first :data:`SKIPPED_SHOWN` reasons (``"file:line: reason"``), so
    that a job on a partly corrupt folder says so instead of completing in silence.
    """

    num_classes: int
    train_size: int
    val_size: int
    coverage_train: float
    coverage_val: float
    feature_dim: int
    data_hash: str
    skipped: int = 0
    skipped_first: list[str] = field(default_factory=list)

    def data_skipped(self) -> dict[str, Any]:
        """``{"count": n, "first": [reasons]}``: the report shown in job metrics, metrics.json,
        the model card and by ``lastkd train``."""
        return {"count": self.skipped, "first": list(self.skipped_first)}


SKIPPED_SHOWN = 10


def skipped_reasons(train_col: SkeletonCollection, val_col: SkeletonCollection) -> list[str]:
    """Every skipped file or sample of both sides, once (a raw folder reports the same list on
    both sides; the other formats report each side's own samples)."""
    return list(dict.fromkeys([*train_col.malformed, *val_col.malformed]))


def data_hash(
    cfg: DataConfig, train_col: SkeletonCollection, val_col: SkeletonCollection, feature_set: str | None
) -> str:
    """Fingerprint (16 hex) of what the model sees: both sources, their sizes and the stream settings."""
    record = {
        "train": [train_col.source_hash, len(train_col)],
        "val": [val_col.source_hash, len(val_col)],
        "streams_mode": cfg.streams_mode,
        "streams": list(cfg.streams),
        "num_frames": cfg.num_frames,
        "feature_set": feature_set,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def build_datasets(
    cfg: DataConfig,
    train_col: SkeletonCollection,
    val_col: SkeletonCollection,
    teacher_store_path: str | os.PathLike[str] | None = None,
    feature_set: str | None = None,
    seed: int = 0,
    teacher_order: TeacherOrder = "joined",
    flipped_views: FlippedViews = "skip",
) -> tuple[SkeletonDataset, SkeletonDataset, DataInfo]:
    """Train and val datasets (teacher features joined when a store and a feature set are given).

    ``teacher_order='shuffled'`` permutes the teacher vectors across clips once, here, with a
    permutation fixed by ``seed`` (see :meth:`TeacherFeatures.shuffled`). ``flipped_views``: what a
    flipped training sample does with its clip's (forward) teacher vector (see DistillConfig).
    """
    if (teacher_store_path is None) != (feature_set is None):
        raise DatasetError("teacher_store_path and feature_set must be given together (or neither)")
    if teacher_order not in get_args(TeacherOrder):
        raise DatasetError(f"teacher_order must be one of {list(get_args(TeacherOrder))}, got {teacher_order!r}")
    if flipped_views not in get_args(FlippedViews):
        raise DatasetError(f"flipped_views must be one of {list(get_args(FlippedViews))}, got {flipped_views!r}")
    if len(train_col) == 0 or len(val_col) == 0:
        raise DatasetError(f"empty split: train has {len(train_col)} samples, val {len(val_col)}")
    t_train = t_val = None
    if teacher_store_path is not None and feature_set is not None:  # given together (checked above)
        t_train = TeacherFeatures.from_store(teacher_store_path, feature_set, train_col.names)
        t_val = TeacherFeatures.from_store(teacher_store_path, feature_set, val_col.names)
        if teacher_order == "shuffled":
            t_train, t_val = t_train.shuffled(seed), t_val.shuffled(seed)
    skipped = skipped_reasons(train_col, val_col)
    train_ds = SkeletonDataset(train_col, cfg, train=True, teacher=t_train, seed=seed, flipped_views=flipped_views)
    val_ds = SkeletonDataset(val_col, cfg, train=False, teacher=t_val, seed=seed)
    info = DataInfo(
        num_classes=cfg.num_classes,
        train_size=len(train_col),
        val_size=len(val_col),
        coverage_train=t_train.coverage.fraction if t_train else 0.0,
        coverage_val=t_val.coverage.fraction if t_val else 0.0,
        feature_dim=t_train.dim if t_train else 0,
        data_hash=data_hash(cfg, train_col, val_col, feature_set),
        skipped=len(skipped),
        skipped_first=skipped[:SKIPPED_SHOWN],
    )
    return train_ds, val_ds, info
