"""FinetuneConfig: one teacher fine-tuning job, validated at the edge.

The defaults are the official VideoMAE V2 ViT-B fine-tuning recipe (its ``run_class_finetuning``
scripts): AdamW (0.9, 0.999), weight decay 0.05 (none on biases, norms and the position table),
layer-wise learning-rate decay 0.75, drop path 0.1, label smoothing 0.1, mixup 0.8 / cutmix 1.0,
random resized crop and flip, 16 frames at sampling rate 4, warmup then cosine, base lr 1e-3 per
256 clips, and the 5 x 3 multi-view test protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lastkd.devices import DEVICE_HELP, DeviceSpec
from lastkd.hashing import sha256_json
from lastkd.ids import check_name
from lastkd.validation import JobConfig, StrictModel

__all__ = ["FinetuneConfig", "FinetuneConfigError"]


class FinetuneConfigError(ValueError):
    """A fine-tuning config that cannot be read or does not validate; the message names each field."""


class FinetuneData(StrictModel):
    """Where the clips come from: an NTU-layout folder split by name, or two clip-list files."""

    path: Path | None = Field(None, description="Folder of NTU-named videos (S001C001P001R001A001_rgb.avi).")
    split: Literal["xsub", "xview", "xsub120", "xset120"] = "xsub"
    train_list: Path | None = Field(None, description="Clip list: one 'path,label' (or 'path label') per line.")
    val_list: Path | None = None
    classes: int | None = Field(None, ge=2, le=10000, description="Head size; default: the largest label + 1.")
    max_clips: int | None = Field(None, ge=1, le=10_000_000, description="Use at most this many clips per split.")
    person_crop: bool = Field(
        False,
        description="Crop each clip to the box around its bodies' joints (the .skeleton colorX/colorY "
        "columns), padded and squared, before resizing: the person fills the input instead of a corner.",
    )
    skeletons: Path | None = Field(None, description="Folder of the clips' .skeleton files (person_crop).")
    crop_pad: float = Field(0.15, ge=0, le=2, description="person_crop: margin around the box, per side, x its size.")

    @model_validator(mode="after")
    def _one_source(self) -> FinetuneData:
        lists = (self.train_list is not None, self.val_list is not None)
        if self.path is None and lists != (True, True):
            raise ValueError("give either path (an NTU-layout folder) or both train_list and val_list")
        if self.path is not None and any(lists):
            raise ValueError("give path or train_list/val_list, not both")
        if self.person_crop and self.skeletons is None:
            raise ValueError("person_crop needs skeletons: the folder of the clips' .skeleton files")
        return self


class FinetuneOptim(StrictModel):
    """AdamW with layer-wise lr decay; ``lr`` None means ``blr * batch_size / 256`` (official)."""

    blr: float = Field(1e-3, gt=0, le=10)
    lr: float | None = Field(None, gt=0, le=10)
    min_lr: float = Field(1e-6, ge=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.75, gt=0, le=1)
    warmup_epochs: float = Field(5.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _betas(self) -> FinetuneOptim:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")
        return self


class FinetuneAugment(StrictModel):
    """Training-time augmentation."""

    mixup: float = Field(0.8, ge=0, le=10, description="Beta(alpha, alpha) mixup; 0 turns it off.")
    cutmix: float = Field(1.0, ge=0, le=10, description="Beta(alpha, alpha) cutmix; 0 turns it off.")
    switch_prob: float = Field(0.5, ge=0, le=1, description="Chance of cutmix when both are on.")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    scale: tuple[float, float] = Field((0.08, 1.0), description="Random resized crop: area fraction range.")
    ratio: tuple[float, float] = Field((0.75, 4 / 3), description="Random resized crop: aspect ratio range.")
    flip: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> FinetuneAugment:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError("scale must be 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1] <= 100:
            raise ValueError("ratio must be 0 < low <= high")
        return self


class FinetuneEval(StrictModel):
    """The official multi-view test protocol: temporal views x spatial crops, softmax averaged."""

    temporal_views: int = Field(5, ge=1, le=32)
    spatial_crops: int = Field(3, ge=1, le=16)
    every_epochs: int = Field(1, ge=1, le=10000, description="Score the val split every N epochs and after the last.")


class FinetuneConfig(JobConfig):
    """One fine-tuning job of a VideoMAE V2 teacher."""

    config_error = FinetuneConfigError
    config_kind = "fine-tuning config"

    name: str = Field(..., description="Name of the published teacher.")
    data: FinetuneData
    model: str = Field("videomae_v2_vit_b", description="A registered VideoMAE V2 size.")
    init: Path | None = Field(
        None, description="Official checkpoint to start from (K710 fine-tune or pre-train encoder); None = random."
    )
    num_frames: int = Field(16, ge=2, le=128)
    sampling_rate: int = Field(4, ge=1, le=64, description="Every N-th frame inside the sampled window.")
    size: int = Field(224, ge=16, le=1024, description="Input side; frames are resized to size * 256 / 224 first.")
    drop_path: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(35, ge=1, le=10000)
    batch_size: int = Field(16, ge=1, le=4096)
    optimizer: FinetuneOptim = FinetuneOptim()
    augment: FinetuneAugment = FinetuneAugment()
    eval: FinetuneEval = FinetuneEval()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: DeviceSpec = Field("auto", description=DEVICE_HELP)
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (decoding).")
    amp: Literal["none", "bf16"] = Field("bf16", description="bf16 autocast on CUDA (ignored on CPU).")
    max_steps_per_epoch: int | None = Field(None, ge=1, le=10_000_000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        from lastkd.models.videomae import check_model_name  # torch: only once a config is validated

        return check_model_name(value)

    def confined(self, roots: Sequence[Path]) -> FinetuneConfig:
        """A copy whose data paths are absolute, real and inside ``roots`` (the one data-root rule,
        :func:`lastkd.datapaths.confine`, as for the student's configs). Raises DataPathError."""
        from lastkd.datapaths import confine

        data = self.data
        update = {
            key: confine(value, roots, field=f"data.{key}", must_exist=True)
            for key in ("path", "skeletons", "train_list", "val_list")
            if (value := getattr(data, key)) is not None
        }
        return self.model_copy(update={"data": data.model_copy(update=update)})

    @property
    def lr(self) -> float:
        """The peak learning rate of the head (the official ``blr * batch / 256`` unless set)."""
        return self.optimizer.lr if self.optimizer.lr is not None else self.optimizer.blr * self.batch_size / 256

    def config_hash(self) -> str:
        """sha256 of the settings that change the result (resume compatibility check)."""
        return sha256_json(self.model_dump(mode="json", exclude={"workers", "device"}))
