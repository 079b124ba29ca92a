"""The teacher model on its device: build the VideoMAE, load its weights, run it in its precision.

:func:`load_teacher` turns an :class:`~lastkd.teacher.engine_config.EngineConfig` into a
:class:`LoadedTeacher`, with every failure (device, model name, weights file) reported as an
:class:`~lastkd.teacher.engine_config.EngineError`. torch is imported inside the functions:
callers that only name these types (the services, at import) must not pay for it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lastkd.teacher.engine_config import EngineConfig, EngineError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lastkd.models.videomae import VideoMAEv2
    from lastkd.teacher.video import PreprocessConfig

__all__ = ["LoadedTeacher", "load_teacher"]


@dataclass(frozen=True)
class LoadedTeacher:
    """A teacher ready for inference: the model (eval, no grad) on ``device``."""

    model: VideoMAEv2
    device: torch.device
    dim: int
    weights_sha256: str | None  # None for a random-init teacher
    precision: str  # resolved: fp32, bf16 or fp16 (names the feature set)

    def inference(self) -> AbstractContextManager[None]:
        """Inference mode, with autocast in ``precision`` (none in fp32)."""
        from lastkd.models.videomae import inference_context

        return inference_context(self.device, self.precision)

    def warm_up(self, num_frames: int, size: int) -> None:
        """One forward pass on a blank clip, so the first real batch does not pay for lazy
        CUDA/oneDNN initialisation; raises EngineError when the output is unusable."""
        import torch

        x = torch.zeros((1, 3, num_frames, size, size), device=self.device)
        with self.inference():
            out = self.model.embed(x)
        if tuple(out.shape) != (1, self.dim) or not bool(torch.isfinite(out.float()).all()):
            raise EngineError(f"warm-up forward produced {tuple(out.shape)} or non-finite values")


def load_teacher(
    config: EngineConfig, preprocess: PreprocessConfig, prebuilt: VideoMAEv2 | None = None
) -> LoadedTeacher:
    """Resolve the device, build the teacher for ``preprocess`` (frames, size) and load its weights.

    ``prebuilt`` replaces the registry model (random-init benchmarks): it is only moved to the
    device. A random-init model is built under ``config.seed``, so one feature-set id always
    means the same weights, without disturbing the caller's random state.
    """
    import torch

    from lastkd.devices import resolve_device
    from lastkd.models.checkpoint_io import load_checkpoint
    from lastkd.models.videomae import create_videomae, resolve_precision

    try:
        device = resolve_device(config.device)
        precision = resolve_precision(config.precision, device)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    if prebuilt is not None:
        model = prebuilt.eval().requires_grad_(False).to(device)
        return LoadedTeacher(model, device, int(model.embed_dim), None, precision)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = create_videomae(
                config.model_name, num_frames=preprocess.num_frames, img_size=preprocess.size, num_classes=0
            )
    except (ValueError, TypeError) as exc:
        raise EngineError(f"cannot build teacher {config.model_name!r}: {exc}") from None
    weights_sha256 = None
    if config.weights is not None:
        weights = Path(config.weights)
        if not weights.is_file():
            raise EngineError(f"teacher weights not found: {weights}")
        try:
            weights_sha256 = load_checkpoint(model, weights)
        except (ValueError, OSError, RuntimeError) as exc:
            raise EngineError(f"cannot load teacher weights {weights}: {exc}") from None
    model.eval().requires_grad_(False)
    return LoadedTeacher(model.to(device), device, int(model.embed_dim), weights_sha256, precision)
