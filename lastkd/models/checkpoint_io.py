"""Checkpoint files for VideoMAE V2: read official ``.pth``/``.pt``/``.safetensors`` safely, load them
strictly through :func:`~lastkd.models.videomae.checkpoint_filter_fn`, and write the official layout.

The model file knows key names and shapes; this module knows files: suffixes, ``weights_only``
unpickling with the fix spelled out when it refuses, truncation, atomic writes, content hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lastkd.hashing import sha256_file
from lastkd.models.videomae import (
    CheckpointError,
    HeadMode,
    VideoMAEv2,
    checkpoint_filter_fn,
    export_official_state_dict,
    names_for_error,
)

__all__ = ["CHECKPOINT_SUFFIXES", "load_checkpoint", "read_checkpoint", "save_official"]

_logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def _read_checkpoint_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {path} has suffix {path.suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    return data


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and "documentation" not in line]
    return lines[-1] if lines else text


def _load_torch_bytes(data: bytes, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe: list[str] = []
        with contextlib.suppress(Exception):  # zip-format files only; just improves the message
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
        unsafe += [g for g in _UNSUPPORTED_GLOBAL.findall(str(exc)) if g not in unsafe]
        if not unsafe:
            raise CheckpointError(
                f"checkpoint {path} is not a readable PyTorch file (corrupt pickle data: {_last_line(str(exc))})"
            ) from exc
        raise CheckpointError(
            f"checkpoint {path} pickles objects that torch.load(weights_only=True) refuses: {', '.join(unsafe)}. "
            "Unsafe loading is never used. Fix: re-save only the weights, e.g. in a trusted Python session "
            "`ck = torch.load(PATH, weights_only=False); torch.save({'model': ck['model']}, NEW_PATH)` "
            "(or save them as .safetensors), then load NEW_PATH"
        ) from exc
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        IndexError,
        KeyError,
        AttributeError,
        TypeError,
    ) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc


def _load_safetensors_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(data)
    except (SafetensorError, RuntimeError, ValueError, OSError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Read a .pth/.pt (weights_only) or .safetensors file; returns (object, sha256 of the bytes read)."""
    path = Path(path)
    data = _read_checkpoint_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors_bytes(data, path), digest
    return _load_torch_bytes(data, path), digest


def _validate_against_model(
    state_dict: Mapping[str, torch.Tensor], model: VideoMAEv2, strict: bool, source: str
) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(f"{source}: tensors with NaN/inf values: {names_for_error(non_finite)}")
    if strict and (missing or unexpected or wrong_shape):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {names_for_error(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {names_for_error(unexpected)}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {names_for_error(wrong_shape)}")
        raise CheckpointError(
            f"{source} does not match the model ({model.config.get('name', type(model).__name__)} "
            f"{model.config.get('embed_dim', '')}-d, depth {model.config.get('depth', '')}): " + "; ".join(parts)
        )
    if missing or unexpected or wrong_shape:
        _logger.warning(
            "non-strict load of %s: missing %s; unexpected %s; skipped for shape %s",
            source,
            names_for_error(missing) or "-",
            names_for_error(unexpected) or "-",
            names_for_error(wrong_shape) or "-",
        )
    return {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}


def load_checkpoint(
    model: VideoMAEv2, path: str | os.PathLike[str], strict: bool = True, head: HeadMode = "auto"
) -> str:
    """Load an official (or our own) checkpoint file into ``model``; returns the file's sha256.

    Accepts ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``; files that pickle other
    objects are refused with the fix spelled out) and ``.safetensors``. Keys go through
    ``checkpoint_filter_fn`` (see there for ``head``). Strict by default: missing / unexpected keys
    and wrong shapes raise ``CheckpointError`` naming them. The model is left untouched on any error.
    """
    path = Path(path)
    obj, digest = read_checkpoint(path)
    sd = checkpoint_filter_fn(obj, model, head=head)
    usable = _validate_against_model(sd, model, strict, f"checkpoint {path}")
    result = model.load_state_dict(usable, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        _logger.debug("load_state_dict report: %s", result)
    _logger.info("loaded %s (sha256 %s) into %s", path, digest, model.config.get("name", "VideoMAEv2"))
    return digest


def save_official(model: VideoMAEv2, path: str | os.PathLike[str]) -> str:
    """Write the official-layout weights to ``.pth``/``.pt`` (``{'model': sd}``) or ``.safetensors``.

    Written to a temporary file and renamed, so a failure leaves no partial file. Returns the sha256.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"cannot save to {path}: suffix must be one of {', '.join(CHECKPOINT_SUFFIXES)}")
    sd = OrderedDict((k, v.detach().to("cpu").contiguous()) for k, v in export_official_state_dict(model).items())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(dict(sd), tmp_name, metadata={"format": "pt", "layout": "videomae_v2_official"})
        else:
            # Through a file object: given a name, torch.save records the (random) temporary file
            # name inside the archive, and the same weights would get another sha256 every time.
            with open(tmp_name, "wb") as fh:
                torch.save({"model": sd}, fh)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return sha256_file(path)
