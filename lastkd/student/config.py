"""TrainConfig: the typed description of one training job, validated at the edge.

A job arrives as YAML (``lastkd train CONFIG.yaml``) or JSON (``POST /train``); both go through
:class:`TrainConfig`, which rejects unknown keys and out-of-range values with messages that name
the field. Everything below (engine, evaluation, publishing) receives the validated object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from lastkd.devices import DEVICE_HELP, DeviceSpec
from lastkd.hashing import sha256_json
from lastkd.ids import NAME_RE, check_name  # noqa: F401  (NAME_RE re-exported for the demo and publishing)
from lastkd.student.data.config import DataConfig
from lastkd.student.distill import DistillConfig
from lastkd.validation import JobConfig, StrictModel


class ConfigError(ValueError):
    """A training config that cannot be read or does not validate; the message names each field."""


class OptimizerConfig(StrictModel):
    """Optimiser choice; momentum/nesterov apply to SGD only."""

    name: Literal["adamw", "sgd"] = "sgd"
    lr: float = Field(0.1, gt=0, le=10)
    weight_decay: float = Field(4e-4, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerConfig:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped every optimiser step (warmup is linear from ~0)."""

    kind: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=1000)
    min_lr: float = Field(0.0, ge=0, le=10)
    milestones: tuple[int, ...] = Field((), description="step schedule: epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in value) or list(value) != sorted(set(value)):
            raise ValueError("milestones must be increasing positive epoch numbers")
        return value


class EvalConfig(StrictModel):
    """What the final evaluation reports beyond top-1/top-5."""

    label_map: Path | None = Field(None, description="Text file, one class name per line (NTU label map).")
    batch_size: int | None = Field(None, ge=1, le=4096, description="Default: the training batch size.")
    jitter_stds: tuple[float, ...] = Field((0.02, 0.05), description="Gaussian joint jitter, normalised units.")
    joint_drop_probs: tuple[float, ...] = Field((0.1, 0.3), description="Probability a joint is missing.")
    frame_drop_probs: tuple[float, ...] = Field((0.1, 0.3), description="Probability a frame is lost.")
    noise_seed: int = Field(1234, ge=0, le=2**31 - 1)
    bn_stats: Literal["per_stream", "shared", "running"] = Field(
        "per_stream",
        description="BatchNorm statistics used to evaluate and publish: recomputed over the training set "
        "per stream (default) or pooled over the streams (the reference forward), or the running averages "
        "left by training (reference behaviour; wrong after short runs).",
    )
    bn_samples: int = Field(
        2048, ge=1, le=10_000_000, description="Training samples the statistics are recomputed over."
    )
    every_epochs: int = Field(
        1,
        ge=1,
        le=10000,
        description="Validate after every N-th epoch and after the last (a full NTU val split costs minutes "
        "per pass); epochs in between have no val_* entries in the history.",
    )

    @field_validator("jitter_stds")
    @classmethod
    def _stds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > 16 or any(not 0 <= v <= 10 for v in value):
            raise ValueError("at most 16 levels, each in [0, 10]")
        return value

    @field_validator("joint_drop_probs", "frame_drop_probs")
    @classmethod
    def _probs(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > 16 or any(not 0 <= v < 1 for v in value):
            raise ValueError("at most 16 levels, each a probability in [0, 1)")
        return value


class TrainConfig(JobConfig):
    """One training job: data, student variant, optimisation, distillation, evaluation."""

    config_error = ConfigError
    config_kind = "training config"

    name: str = Field(..., description="Registry name of the published student.")
    data: DataConfig
    variant: Literal["small", "base", "large"] = "small"
    epochs: int = Field(..., ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=4096, description="Global batch (split across DDP ranks).")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    distill: DistillConfig = DistillConfig()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: DeviceSpec = Field("auto", description=DEVICE_HELP)
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per rank.")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="Autocast dtype; CUDA only.")
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="Max global grad norm.")
    eval: EvalConfig = EvalConfig()
    max_steps_per_epoch: int | None = Field(None, ge=1, le=10_000_000)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.amp != "none" and self.device == "cpu":
            raise ValueError("amp needs CUDA: set amp to 'none' or device to 'cuda'/'auto'")
        if self.schedule.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) exceeds epochs ({self.epochs})")
        if any(m > self.epochs for m in self.schedule.milestones):
            raise ValueError("schedule.milestones must not exceed epochs")
        return self

    # --- identity -----------------------------------------------------------------------------
    def training_dict(self) -> dict[str, Any]:
        """The fields that determine the training trajectory (JSON-safe).

        Worker count, device choice and evaluation settings are left out: a job may resume on
        another host or with another loader width without being a different training run.
        """
        return self.model_dump(mode="json", exclude={"workers", "device", "eval"})

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`training_dict` (resume compatibility check)."""
        return sha256_json(self.training_dict())

    # --- paths ----------------------------------------------------------------------------------
    def path_fields(self) -> dict[str, Path]:
        """Every filesystem path the job reads, keyed by its dotted field name (None omitted)."""
        found = {
            "data.path": self.data.path,
            "data.label_path": self.data.label_path,
            "data.missing_skeletons": self.data.missing_skeletons,
            "data.cache_dir": self.data.cache_dir,
            "eval.label_map": self.eval.label_map,
        }
        return {k: v for k, v in found.items() if v is not None}

    def to_yaml(self) -> str:
        """The config as YAML text (round-trips through :meth:`from_yaml`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
