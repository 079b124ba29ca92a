"""How the teacher engine is configured, and the feature set a configuration names.

:class:`EngineConfig` is the plain-object form of the ``teacher_*`` settings; the adapters here
turn the typed Settings into the engine's configuration, input limits and preprocessing. The
HTTP service and the bulk CLI both go through them, so the same settings give the same
feature-set id (:func:`planned_set_id`) and the same vectors on either path. Nothing here
builds a model or opens a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastkd.errors import NotFoundError
from lastkd.hashing import sha256_file
from lastkd.registry import RegistryError, find_teacher
from lastkd.teacher.video import PreprocessConfig, VideoLimits

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lastkd.services.settings import Settings

__all__ = [
    "RANDOM_INIT",
    "EngineConfig",
    "EngineError",
    "effective_precision",
    "limits_from_settings",
    "planned_set_id",
    "preprocess_from_settings",
    "preprocessing_record",
]

RANDOM_INIT = "random-init"


class EngineError(RuntimeError):
    """The engine cannot start: bad model name, missing weights, unusable device, store conflict."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs (the plain-object form of the teacher_* settings)."""

    model_name: str = "videomae_v2_vit_b"
    weights: Path | None = None
    random_init: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16, fp16 (CUDA only)
    batch_size: int = 8
    max_wait_ms: int = 20
    decode_workers: int = 0  # 0 = lastkd.teacher.decoders.default_decode_workers(device)
    store_dtype: str = "float32"
    seed: int = 0  # random-init teachers are seeded so that the same set id means the same weights
    skeletons: Path | None = None  # the clips' .skeleton files, for the person crop
    decoder: str = "cpu"  # cpu (FFmpeg software) or nvdec (checked for real when the engine starts)

    def __post_init__(self) -> None:
        # The one place the engine settings are judged, before any model or store is touched:
        # `lastkd embed` and `lastkd serve-teacher` both build this first and print the same
        # message (exit 2) when it refuses.
        from lastkd.models.videomae import check_model_name

        try:
            check_model_name(self.model_name)
        except ValueError as exc:
            raise EngineError(f"cannot build teacher {self.model_name!r}: {exc}") from None
        if self.weights is None and not self.random_init:
            raise EngineError(
                f"no teacher weights configured for {self.model_name!r}: set LASTKD_TEACHER_WEIGHTS to an "
                "official VideoMAE V2 checkpoint (.pth or .safetensors), or set LASTKD_TEACHER_RANDOM_INIT=true "
                "to run a randomly initialised teacher (tests and demos only; its features are labelled random-init)"
            )
        from lastkd.models.videomae import PRECISIONS

        if self.precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.weights is not None and self.random_init:
            raise EngineError("teacher weights and random_init are both set; choose one")
        if self.batch_size < 1:
            raise EngineError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_wait_ms < 0:
            raise EngineError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EngineConfig:
        """The teacher_* fields of the typed Settings, with optional overrides (CLI flags)."""
        weights = settings.teacher_weights
        if settings.teacher_name is not None:
            if weights is not None:
                raise EngineError("LASTKD_TEACHER_WEIGHTS and LASTKD_TEACHER_NAME are both set; choose one")
            try:
                weights = find_teacher(settings.resolved_registry_dir, settings.teacher_name)
            except (NotFoundError, RegistryError) as exc:
                raise EngineError(f"LASTKD_TEACHER_NAME: {exc}") from None
        values: dict[str, Any] = dict(
            model_name=settings.teacher_model,
            weights=weights,
            random_init=settings.teacher_random_init,
            device=settings.teacher_device,
            precision=settings.teacher_precision,
            batch_size=settings.teacher_batch_size,
            max_wait_ms=settings.teacher_max_wait_ms,
            decode_workers=settings.decode_workers,
            skeletons=settings.teacher_skeletons,
            decoder=settings.teacher_decode,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def limits_from_settings(settings: Settings) -> VideoLimits:
    """The input limits (bytes, seconds, pixels) of the typed Settings."""
    return VideoLimits(
        max_bytes=settings.max_upload_bytes,
        max_seconds=settings.max_clip_seconds,
        max_pixels=settings.max_clip_pixels,
        min_frames=settings.min_clip_frames,
    )


def preprocess_from_settings(
    settings: Settings, sampling: str | None = None, protocol: str | None = None
) -> PreprocessConfig:
    """The sampling / preprocessing of the typed Settings (``teacher_sampling``, ``teacher_protocol``),
    with optional overrides (the ``lastkd embed --sampling/--protocol`` flags).

    The service and the bulk CLI both build their PreprocessConfig here, so the same settings
    give the same feature-set id and the same vectors on either path. The official extraction
    squashes the whole frame, so with multiview sampling it has one spatial view per window.
    """
    protocol = protocol or settings.teacher_protocol
    crops = {"spatial_crops": 1} if protocol == "official_extraction" else {}
    return PreprocessConfig(
        sampling=sampling or settings.teacher_sampling,
        protocol=protocol,
        num_frames=settings.teacher_num_frames,
        size=settings.teacher_size,
        person_crop=settings.teacher_person_crop,
        **crops,
    )


def preprocessing_record(preprocess: PreprocessConfig, precision: str) -> dict[str, Any]:
    """What goes into the feature-set id besides teacher and weights: the preprocessing, the frame
    count and size the model is built with, and the (resolved) precision it runs in."""
    return {
        **preprocess.as_dict(),
        "model_num_frames": preprocess.num_frames,
        "model_img_size": preprocess.size,
        "precision": precision,
    }


def effective_precision(config: EngineConfig) -> str:
    """The precision ``config`` runs in on its device (``auto`` resolved; refusals as EngineError)."""
    from lastkd.devices import resolve_device
    from lastkd.models.videomae import resolve_precision

    try:
        return resolve_precision(config.precision, resolve_device(config.device))
    except ValueError as exc:  # DeviceError is a ValueError too
        raise EngineError(str(exc)) from None


def planned_set_id(config: EngineConfig, preprocess: PreprocessConfig) -> str:
    """The feature-set id an engine with these settings will write to, without building it
    (hashes the weights file when there is one)."""
    from lastkd.featurestore import FeatureStoreError, feature_set_id

    weights_sha = None
    if config.weights is not None:
        try:
            weights_sha = sha256_file(config.weights)
        except OSError as exc:
            raise EngineError(f"cannot read teacher weights {config.weights}: {exc.strerror or exc}") from None
    try:
        return feature_set_id(
            config.model_name, weights_sha, preprocessing_record(preprocess, effective_precision(config))
        )
    except FeatureStoreError as exc:
        raise EngineError(str(exc)) from None
