"""The errors a training run raises (a module of their own so the sampler, the checkpoint files
and the loop can all raise them without importing each other)."""

from __future__ import annotations

__all__ = ["ResumeError", "TrainError"]


class TrainError(RuntimeError):
    """Training cannot start or continue (bad device, unusable data, diverged loss)."""


class ResumeError(TrainError):
    """``run_dir`` holds a checkpoint that cannot be resumed with this config."""
