"""Typed configuration of the skeleton data pipeline (part of TrainConfig).

Validated once when a job config is read; the data code receives these objects as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lastkd.validation import StrictModel

SourceFormat = Literal["ntu_raw", "ctrgcn_npz", "pyskl", "last_npy"]
Split = Literal["xsub", "xview", "xsub120", "xset120"]
StreamsMode = Literal["standard", "reference"]
StreamName = Literal["joint", "velocity", "bone"]
STREAMS: tuple[StreamName, ...] = ("joint", "velocity", "bone")


class AugmentConfig(StrictModel):
    """Training-time augmentations; each one can be switched off on its own."""

    rotate: bool = True
    rotate_max_deg: float = Field(15.0, ge=0, le=180)
    scale: bool = True
    scale_range: tuple[float, float] = (0.9, 1.1)
    shear: bool = True
    shear_max: float = Field(0.1, ge=0, le=1)
    flip: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1)
    noise: bool = True
    noise_std: float = Field(0.01, ge=0, le=1)
    time_crop: bool = Field(
        True,
        description="Random temporal window in training: standard mode samples a random fraction "
        "(time_crop_range) of the valid frames; reference mode a random start. Off: the validation window.",
    )
    time_crop_range: tuple[float, float] = (0.5, 1.0)
    joint_drop: bool = False
    joint_drop_prob: float = Field(0.05, ge=0, le=1)
    part_drop: bool = False
    part_drop_prob: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 10:
            raise ValueError("scale_range must satisfy 0 < low <= high <= 10")
        lo, hi = self.time_crop_range
        if not 0 < lo <= hi <= 1:
            raise ValueError("time_crop_range must satisfy 0 < low <= high <= 1")
        return self


class DataConfig(StrictModel):
    """Where the skeletons come from and how they become model input."""

    format: SourceFormat = "ntu_raw"
    path: Path = Field(..., description="Folder of .skeleton files, .npz file, .pkl file or LAST stream folder.")
    label_path: Path | None = Field(None, description="last_npy only: label pickle if not beside the arrays.")
    dataset: Literal["ntu60", "ntu120"] = "ntu60"
    split: Split = "xsub"
    missing_skeletons: Path | None = Field(None, description="Official list of samples without skeletons.")
    cache_dir: Path | None = Field(None, description="Parse cache; default <path>/.lastkd_cache for folders.")
    streams_mode: StreamsMode = "standard"
    streams: tuple[StreamName, ...] = STREAMS
    num_frames: int = Field(64, ge=4, le=1024)
    augment: AugmentConfig = AugmentConfig()
    max_samples: int | None = Field(None, ge=1, description="Cap per split, for quick experiments.")
    classes: int | None = Field(
        None,
        ge=2,
        le=120,
        description="Classifier outputs (labels must lie below it); default 60 (ntu60) or 120 (ntu120). "
        "Set it to the classes in the data, e.g. 5 for a 5-class subset: a 60-way head trained on 5 "
        "classes spends its label smoothing on 55 classes that never occur.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.split in ("xsub120", "xset120") and self.dataset != "ntu120":
            raise ValueError(f"split {self.split!r} needs dataset 'ntu120'")
        if not self.streams or len(set(self.streams)) != len(self.streams):
            raise ValueError("streams must be a non-empty list without repeats")
        if self.label_path is not None and self.format != "last_npy":
            raise ValueError("label_path applies to format 'last_npy' only")
        return self

    @property
    def num_classes(self) -> int:
        """Classifier outputs: ``classes`` when set, else the dataset's class count."""
        if self.classes is not None:
            return self.classes
        return 60 if self.dataset == "ntu60" else 120
