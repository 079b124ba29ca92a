"""The RGB clips of a fine-tuning job: which files, which labels, and how a clip becomes input.

Two sources: an NTU-layout folder (``*_rgb.avi`` named like the skeletons, labels and the
train/val split from the names by the skeleton side's own rules, so teacher and student never see
each other's val clips) or clip-list files (``path,label`` or ``path label`` per line, as the
official code takes). Training clips are a random window of ``num_frames`` frames every
``sampling_rate``-th frame, a random resized crop and a horizontal flip; val clips go through the
multi-view test protocol of :func:`lastkd.teacher.video.decode_clip`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lastkd.datapaths import confine
from lastkd.finetune.config import FinetuneConfig, FinetuneConfigError
from lastkd.ntu.skeleton import (
    SampleNameError,
    SkeletonParseError,
    color_boxes,
    parse_sample_name,
    person_box,
    sample_name_from_path,
)
from lastkd.ntu.splits import is_train
from lastkd.teacher.video import Box, PreprocessConfig, VideoLimits, decode_clip, decode_frames

__all__ = ["ClipList", "TrainClips", "ValClips", "list_clips", "random_window"]


MAX_LIST_LINES = 5_000_000
# Frames are resized so the short side is size * 256 / 224 before cropping (the official 256 -> 224).
RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class ClipList:
    """Clip files and their 0-based labels, sorted by path (a stable order for seeds and resumes)."""

    paths: list[Path]
    labels: list[int]


def _read_list(path: Path, roots: Sequence[Path] | None) -> ClipList:
    if not path.is_file():
        raise FinetuneConfigError(f"clip list not found: {path}")
    pairs: list[tuple[Path, int]] = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for n, line in enumerate(fh, 1):
            if n > MAX_LIST_LINES:
                raise FinetuneConfigError(f"{path}: more than {MAX_LIST_LINES} lines")
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(",", 1) if "," in text else text.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise FinetuneConfigError(
                    f"{path}:{n}: expected 'path,label' with an integer label >= 0, got {text[:80]!r}"
                )
            clip = Path(parts[0].strip())
            clip = clip if clip.is_absolute() else path.parent / clip
            if roots is not None:  # what a list names is read too: the data-root rule applies
                clip = confine(clip, roots, field=f"{path.name}:{n}")
            pairs.append((clip, int(parts[1])))
    if not pairs:
        raise FinetuneConfigError(f"{path}: no clips listed")
    pairs.sort()
    return ClipList([p for p, _ in pairs], [label for _, label in pairs])


def _keep(clips: ClipList, wanted: Callable[[Path], bool]) -> ClipList:
    pairs = [(p, y) for p, y in zip(clips.paths, clips.labels, strict=True) if wanted(p)]
    return ClipList([p for p, _ in pairs], [y for _, y in pairs])


def list_clips(cfg: FinetuneConfig, roots: Sequence[Path] | None = None) -> tuple[ClipList, ClipList]:
    """The (train, val) clips of ``cfg.data``; raises FinetuneConfigError when a side is empty.
    With ``roots``, every clip a list file names must lie inside them (DataPathError)."""
    data = cfg.data
    if data.path is not None:
        if not data.path.is_dir():
            raise FinetuneConfigError(f"data.path is not a folder: {data.path}")
        sides: dict[bool, list[tuple[Path, int]]] = {True: [], False: []}
        for video in sorted(data.path.glob("*_rgb.avi")):
            try:
                name = parse_sample_name(sample_name_from_path(video))
            except SampleNameError:
                continue  # not a dataset clip (a stray file): the skeleton side skips them too
            sides[is_train(name, data.split)].append((video, name.label))
        train = ClipList([p for p, _ in sides[True]], [label for _, label in sides[True]])
        val = ClipList([p for p, _ in sides[False]], [label for _, label in sides[False]])
    else:
        assert data.train_list is not None and data.val_list is not None  # the config's rule
        train, val = _read_list(data.train_list, roots), _read_list(data.val_list, roots)
    if data.person_crop:
        # NTU has clips without a skeleton file (its official missing-skeleton list): no box can
        # be made for them, so they are left out of a person-crop run rather than failing it.
        assert data.skeletons is not None  # the config's rule
        skeletons = data.skeletons

        def has_skeleton(path: Path) -> bool:
            return (skeletons / f"{sample_name_from_path(path)}.skeleton").is_file()

        train, val = _keep(train, has_skeleton), _keep(val, has_skeleton)
    if data.max_clips is not None:
        train = ClipList(train.paths[: data.max_clips], train.labels[: data.max_clips])
        val = ClipList(val.paths[: data.max_clips], val.labels[: data.max_clips])
    for side, clips in (("train", train), ("val", val)):
        if not clips.paths:
            raise FinetuneConfigError(f"no {side} clips found for {data.path or data.train_list} (split {data.split})")
    if data.classes is not None:
        high = max(max(train.labels), max(val.labels))
        if high >= data.classes:
            raise FinetuneConfigError(f"label {high} does not fit data.classes={data.classes}")
    return train, val


def random_window(length: int, num_frames: int, rate: int, rng: random.Random) -> list[int]:
    """``num_frames`` indices every ``rate`` frames from a random start (official training sampling);
    a clip shorter than the window is sampled over its whole length instead."""
    span = num_frames * rate
    if length >= span:
        start = rng.randint(0, length - span)
        return [start + i * rate for i in range(num_frames)]
    return [min(length - 1, round(i * length / num_frames)) for i in range(num_frames)]


def _resize_cfg(cfg: FinetuneConfig) -> PreprocessConfig:
    return PreprocessConfig(num_frames=cfg.num_frames, size=round(cfg.size * RESIZE_RATIO))


class _Boxes:
    """Each clip's person box, read from its .skeleton file once (None: no crop, or a skeleton
    without any body, where the whole frame is used)."""

    def __init__(self, clips: ClipList, cfg: FinetuneConfig) -> None:
        self.clips, self.cfg = clips, cfg
        self.cache: dict[int, Box | None] = {}

    def __call__(self, index: int) -> Box | None:
        data = self.cfg.data
        if not data.person_crop:
            return None
        if index not in self.cache:
            assert data.skeletons is not None  # the config's rule
            name = sample_name_from_path(self.clips.paths[index])
            path = data.skeletons / f"{name}.skeleton"
            try:
                self.cache[index] = person_box(color_boxes(path), data.crop_pad)
            except (OSError, SkeletonParseError) as exc:
                raise FinetuneConfigError(f"person_crop: cannot read {path}: {exc}") from None
        return self.cache[index]


class TrainClips(Dataset):
    """Training clips as uint8 ``(T, S, S, 3)`` tensors and labels; draws from ``random``
    seeded per (seed, epoch, index) so a resumed run sees the same clips as an uninterrupted one."""

    def __init__(self, clips: ClipList, cfg: FinetuneConfig, limits: VideoLimits) -> None:
        self.clips, self.cfg, self.limits = clips, cfg, limits
        self.resize = _resize_cfg(cfg)
        self.boxes = _Boxes(clips, cfg)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch whose draws to make (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        cfg, aug = self.cfg, self.cfg.augment
        rng = random.Random(f"{cfg.seed}/{self.epoch}/{index}")
        frames = decode_frames(
            self.clips.paths[index],
            lambda length: random_window(length, cfg.num_frames, cfg.sampling_rate, rng),
            self.resize,
            self.limits,
            box=self.boxes(index),
        )
        h, w = frames.shape[1:3]
        y, x, ch, cw = _resized_crop_box(h, w, aug.scale, aug.ratio, rng)
        clip = torch.from_numpy(np.ascontiguousarray(frames[:, y : y + ch, x : x + cw]))
        # (T, h, w, 3) -> (T, 3, h, w) for interpolate, then back: one resize for every frame
        clip = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=(cfg.size, cfg.size), mode="bilinear")
        clip = clip.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        if aug.flip and rng.random() < 0.5:
            clip = clip.flip(2)
        return clip.contiguous(), self.clips.labels[index]


def _resized_crop_box(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (10 tries, then the centre crop within the ratio range)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class ValClips(Dataset):
    """Val clips in the multi-view test protocol of :func:`lastkd.teacher.video.decode_clip`:
    uint8 ``(V, T, S, S, 3)`` and the label (with ``person_crop``: the temporal views of the box)."""

    def __init__(self, clips: ClipList, cfg: FinetuneConfig, limits: VideoLimits) -> None:
        self.clips, self.limits = clips, limits
        self.boxes = _Boxes(clips, cfg)
        self.preprocess = PreprocessConfig(
            sampling="multiview",
            num_frames=cfg.num_frames,
            stride=cfg.sampling_rate,
            temporal_views=cfg.eval.temporal_views,
            spatial_crops=cfg.eval.spatial_crops,
            size=cfg.size,
        )

    def __len__(self) -> int:
        return len(self.clips.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        box = self.boxes(index)
        cfg = self.preprocess.model_copy(update={"person_crop": box is not None})
        views = decode_clip(self.clips.paths[index], cfg, self.limits, threads=1, box=box).views
        return torch.from_numpy(np.ascontiguousarray(views)), self.clips.labels[index]
