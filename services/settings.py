"""The one typed settings object of lastkd.

Read once at the edge (CLI start-up, service start-up) from environment variables prefixed
``LASTKD_`` and an optional ``.env`` file, validated, then passed down as a plain object. Nothing
below the edge reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError as _SourceError

from lastkd.devices import DEVICE_HELP, DeviceSpec

GiB = 1024**3
MiB = 1024**2


class SettingsError(ValueError):
    """Raised when the environment holds settings that do not validate."""


# Transports the trainer's Celery app can use across processes (in-memory ones cannot: the worker
# is another process). SQLAlchemy URLs take a dialect after the prefix, e.g. sqla+sqlite:///x.db.
BROKER_SCHEMES = frozenset({"redis", "rediss", "amqp", "amqps", "pyamqp"})
RESULT_SCHEMES = frozenset({"redis", "rediss", "rpc"})
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info part (``scheme://user:PASSWORD@host``) masked."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def check_celery_url(url: str, schemes: frozenset[str], sqlalchemy_prefix: str) -> str:
    """Check the shape of a broker / result-backend URL so a typo fails at start-up, not at the
    first job: a known scheme (or ``<sqlalchemy_prefix><dialect>``), and a port that is a number.
    Messages show the URL with its password masked."""
    scheme, sep, rest = url.partition("://")
    shown = redact_url(url)
    known = scheme in schemes or (scheme.startswith(sqlalchemy_prefix) and len(scheme) > len(sqlalchemy_prefix))
    if not sep or not _SCHEME.fullmatch(scheme) or not known:
        allowed = ", ".join(f"{name}://" for name in sorted(schemes))
        raise ValueError(
            f"{shown!r} is not a usable URL: expected one of {allowed} or {sqlalchemy_prefix}<dialect>:///..."
        )
    if scheme.startswith(sqlalchemy_prefix) and not rest.strip("/"):
        raise ValueError(f"{shown!r} names no database (e.g. {scheme}:///var/broker.sqlite)")
    try:
        urlsplit(url).port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"{shown!r} has a bad port: {exc}") from None
    return url


class Settings(BaseSettings):
    """Every knob of the stack, with defaults that run on one laptop with no servers."""

    model_config = SettingsConfigDict(
        env_prefix="LASTKD_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # `LASTKD_API_TOKEN=` (as a copied .env.example may leave it) means unset, never "": an
        # empty token must not count as one, and an empty path must not mean the working directory.
        env_ignore_empty=True,
    )

    # --- locations -------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Root of everything the stack writes.")
    store_path: Path | None = Field(None, description="LMDB feature store; default <data_dir>/features.lmdb")
    store_map_size: int = Field(64 * GiB, ge=16 * MiB, le=1 << 44, description="LMDB map size in bytes.")
    registry_dir: Path | None = Field(None, description="Published students; default <data_dir>/registry")
    jobs_dir: Path | None = Field(None, description="Job records and job checkpoints; default <data_dir>/jobs")
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Folders that training configs may read from (default: [<data_dir>/datasets]).",
    )

    # --- broker ------------------------------------------------------------------------------
    broker_url: str | None = Field(None, description="Celery broker; default SQLite under data_dir (no server).")
    result_backend: str | None = Field(None, description="Celery result backend; default SQLite under data_dir.")

    # --- HTTP --------------------------------------------------------------------------------
    api_token: SecretStr | None = Field(None, description="Bearer token for mutating endpoints.")
    teacher_host: str = "127.0.0.1"
    teacher_port: int = Field(8100, ge=1, le=65535)
    trainer_host: str = "127.0.0.1"
    trainer_port: int = Field(8200, ge=1, le=65535)

    # --- teacher -------------------------------------------------------------------------------
    teacher_model: str = Field("videomae_v2_vit_b", description="Registry name of the teacher model.")
    teacher_weights: Path | None = Field(None, description="Official checkpoint (.pth or .safetensors).")
    teacher_name: str | None = Field(
        None,
        description="A fine-tuned teacher from the registry (<registry>/_teachers): its folder name, or its "
        "name when one version exists. Instead of teacher_weights.",
    )
    teacher_random_init: bool = Field(False, description="Run without weights (tests, demo). Labelled random-init.")
    teacher_device: DeviceSpec = Field("auto", description=DEVICE_HELP)
    teacher_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on CUDA, fp32 on the CPU; fp16 needs CUDA. Part of the feature-set id: "
        "vectors made in different precisions never share a set.",
    )
    teacher_batch_size: int = Field(8, ge=1, le=1024)
    teacher_max_wait_ms: int = Field(20, ge=0, le=10_000)
    teacher_queue_size: int = Field(64, ge=1, le=100_000)
    decode_workers: int = Field(0, ge=0, le=256, description="0 = one per core with a GPU, half the cores on CPU")
    teacher_sampling: Literal["uniform", "multiview"] = Field(
        "uniform", description="Frame sampling: one uniform clip, or VideoMAE V2's multi-view test protocol."
    )
    teacher_protocol: Literal["imagenet", "official_extraction"] = Field(
        "imagenet", description="Preprocessing: ImageNet short-side crop + normalisation, or the official extraction."
    )
    teacher_num_frames: int = Field(16, ge=2, le=256, description="Frames per clip the teacher sees (16 official).")
    teacher_size: int = Field(224, ge=16, le=1024, description="Input side in pixels (224 official).")
    teacher_person_crop: bool = Field(
        False,
        description="Cut each clip to its person box (the .skeleton colorX/colorY) before resizing; part of the "
        "feature-set id. Needs teacher_skeletons.",
    )
    teacher_skeletons: Path | None = Field(None, description="Folder of the clips' .skeleton files (person crop).")
    teacher_decode: Literal["cpu", "nvdec"] = Field(
        "cpu",
        description="Video decoding in the decoder processes: FFmpeg on the CPU, or NVIDIA's NVDEC (refused with "
        "the reason where the hardware is not usable; never a silent fallback).",
    )

    # --- limits --------------------------------------------------------------------------------
    max_upload_bytes: int = Field(512 * MiB, ge=1, le=1 << 40)
    max_clip_seconds: float = Field(600.0, gt=0, le=86_400)
    max_clip_pixels: int = Field(4096 * 2160, ge=1, le=1 << 30)
    # Clips with fewer real frames are refused (reason too_short); 1 embeds even a one-frame
    # video by repeating it (the answer's frames_used shows how many real frames were used).
    min_clip_frames: int = Field(1, ge=1, le=100_000)
    max_clips_per_request: int = Field(64, ge=1, le=10_000)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and (
            value != value.strip() or any(c.isspace() or not c.isprintable() for c in value)
        ):
            raise ValueError("must not contain whitespace or control characters (it is sent in an HTTP header)")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        return None if value is None else check_celery_url(value, BROKER_SCHEMES, "sqla+")

    @field_validator("result_backend")
    @classmethod
    def _backend(cls, value: str | None) -> str | None:
        return None if value is None else check_celery_url(value, RESULT_SCHEMES, "db+")

    @model_validator(mode="after")
    def _token_for_public_bind(self) -> Settings:
        for name in ("teacher_host", "trainer_host"):
            host = getattr(self, name)
            if not is_loopback(host) and self.api_token is None:
                raise ValueError(
                    f"{name}={host!r} is not a loopback address: set LASTKD_API_TOKEN before "
                    "listening on a public interface"
                )
        return self

    # --- derived paths ------------------------------------------------------------------------
    @cached_property
    def resolved_store_path(self) -> Path:
        """The LMDB feature store directory."""
        return self.store_path or self.data_dir / "features.lmdb"

    @cached_property
    def resolved_registry_dir(self) -> Path:
        """Where published students live."""
        return self.registry_dir or self.data_dir / "registry"

    @cached_property
    def resolved_jobs_dir(self) -> Path:
        """Job records and job checkpoints."""
        return self.jobs_dir or self.data_dir / "jobs"

    @cached_property
    def resolved_data_roots(self) -> list[Path]:
        """Absolute folders that training configs may read from."""
        roots = self.data_roots or [self.data_dir / "datasets"]
        return [root.resolve() for root in roots]

    @cached_property
    def resolved_broker_url(self) -> str:
        """The Celery broker URL (embedded SQLite when unset)."""
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @cached_property
    def resolved_result_backend(self) -> str:
        """The Celery result backend URL (embedded SQLite when unset)."""
        return self.result_backend or f"db+sqlite:///{(self.data_dir / 'results.sqlite').resolve()}"

    def token(self) -> str | None:
        """The API token as plain text, or None when auth is off."""
        return self.api_token.get_secret_value() if self.api_token else None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, which may be bound without a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and overrides), turning validation errors into one
    readable message that names each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]  # any values: validating them is what this does
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"]) or "settings"
            var = f"LASTKD_{loc.upper()}" if err["loc"] else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {var}: {msg}")
        raise SettingsError("invalid lastkd settings:\n" + "\n".join(lines)) from None
    except _SourceError as exc:
        # Raised before validation, e.g. a list/JSON variable that is not valid JSON.
        match = re.search(r'field "(\w+)"', str(exc))
        var = f"LASTKD_{match.group(1).upper()}" if match else "settings"
        raise SettingsError(f"invalid lastkd settings:\n  {var}: {exc} (expected JSON, e.g. '[\"/data\"]')") from None
