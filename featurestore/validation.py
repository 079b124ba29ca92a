"""Input checks for the feature store, each raising :class:`InvalidFeatureError` with a message
that names the offending item, so that a bad batch is rejected before anything is written.

The checks on clip ids run on every read as well, so the common (valid) case is handled with a
few C-level passes over the batch; the slow per-item path only runs to build the message.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from lastkd.featurestore.errors import InvalidFeatureError

MAX_ID_BYTES = 256
MAX_SET_ID_BYTES = 160
MAX_DIM = 1 << 16
DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}

# Cc, the Unicode control characters: never part of a clip id, and \x00 separates key parts.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ASCII_CONTROLS = bytes(range(0x20)) + b"\x7f"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_TEACHER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_SHOWN = 60


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def as_id_list(ids: object, what: str = "ids") -> list:
    """Turn ``ids`` into a list, refusing a bare string (a classic mistake: it iterates chars)."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise InvalidFeatureError(f"{what} must be a sequence of strings, not a single {type(ids).__name__}")
    if isinstance(ids, list):
        return ids
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise InvalidFeatureError(f"{what} must be one-dimensional, got an array of shape {ids.shape}")
    try:
        return list(ids)  # type: ignore[call-overload]  # any object: a non-iterable raises TypeError
    except TypeError:
        raise InvalidFeatureError(f"{what} must be a sequence of strings, got {type(ids).__name__}") from None


def check_clip_id(clip_id: object, where: str = "clip id") -> bytes:
    """Validate one clip id and return its UTF-8 encoding."""
    if not isinstance(clip_id, str):
        raise InvalidFeatureError(f"{where} must be a str, got {type(clip_id).__name__} {_show(clip_id)}")
    if not clip_id:
        raise InvalidFeatureError(f"{where} is empty")
    match = _CONTROL.search(clip_id)
    if match:
        raise InvalidFeatureError(
            f"{where} {_show(clip_id)} contains control character {match.group()!r} at position {match.start()}"
        )
    try:
        raw = clip_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidFeatureError(f"{where} {_show(clip_id)} is not valid Unicode text ({exc.reason})") from None
    if len(raw) > MAX_ID_BYTES:
        raise InvalidFeatureError(f"{where} {_show(clip_id)} is {len(raw)} bytes in UTF-8; the limit is {MAX_ID_BYTES}")
    return raw


def encode_clip_ids(ids: object, *, unique: bool, prefix: bytes = b"") -> tuple[list[str], list[bytes]]:
    """Validate a batch of clip ids; return them as a list and as ``prefix`` + UTF-8 keys.

    ``unique`` rejects a batch naming the same id twice (writes); reads may repeat ids.
    """
    items = as_id_list(ids)
    try:
        joined = "".join(items)  # raises TypeError on the first non-str: one C-level pass
        if joined.isascii():  # the common case: one C-level scan of the bytes for controls
            raw = joined.encode("ascii")
            clean = len(raw.translate(None, _ASCII_CONTROLS)) == len(raw)
        else:
            clean = not _CONTROL.search(joined)
        keys = [prefix + item.encode("utf-8") for item in items]
        ok = clean and (not keys or (max(map(len, keys)) <= len(prefix) + MAX_ID_BYTES and "" not in items))
    except (TypeError, AttributeError, UnicodeEncodeError):
        ok = False
    if not ok:
        keys = [prefix + check_clip_id(item, f"ids[{i}]") for i, item in enumerate(items)]
    if unique and len(set(keys)) != len(keys):
        seen: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise InvalidFeatureError(
                    f"duplicate clip id {_show(items[i])} in one batch (ids[{seen[key]}] and ids[{i}])"
                )
            seen[key] = i
    return items, keys


def check_sha256(value: object, where: str = "sha256") -> str:
    """Validate a hex sha256 digest and return it lower-cased."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidFeatureError(f"{where} must be 64 hexadecimal characters, got {_show(value)}")
    return value.lower()


def check_sha256_batch(sha256s: object, n: int) -> list[str | None] | None:
    """Validate the optional content digests aligned with a batch of ``n`` ids."""
    if sha256s is None:
        return None
    items = as_id_list(sha256s, "sha256s")
    if len(items) != n:
        raise InvalidFeatureError(f"sha256s has {len(items)} entries but the batch has {n} ids")
    return [None if s is None else check_sha256(s, f"sha256s[{i}]") for i, s in enumerate(items)]


def check_vectors(vectors: object, n: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Validate a batch of ``n`` vectors against a set's ``dim`` and ``dtype``.

    Any real floating input is accepted and converted to the set dtype (a float32 teacher output
    into a float16 set is the normal case); integers, booleans, complex and objects are refused,
    as are NaN/Inf, including values that overflow when narrowed to float16.
    Returns a C-contiguous little-endian array of the set dtype.
    """
    if isinstance(vectors, np.ndarray):
        arr = vectors
    else:
        try:
            arr = np.asarray(vectors)
        except (TypeError, ValueError) as exc:
            raise InvalidFeatureError(f"vectors cannot be read as an array: {exc}") from None
    if arr.dtype.kind != "f":
        raise InvalidFeatureError(f"vectors must be floating point (float16/float32), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InvalidFeatureError(f"vectors must be a 2-D array (n, {dim}), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise InvalidFeatureError(f"got {arr.shape[0]} vectors for {n} ids")
    if arr.shape[1] != dim:
        raise InvalidFeatureError(f"vectors have dim {arr.shape[1]}, the feature set expects dim {dim}")
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = (int(x) for x in np.argwhere(bad)[0])
        raise InvalidFeatureError(f"vectors[{row}][{col}] is {float(arr[row, col])!r}: NaN and Inf are not allowed")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if out is not arr:
        bad = ~np.isfinite(out)
        if bad.any():
            row, col = (int(x) for x in np.argwhere(bad)[0])
            raise InvalidFeatureError(f"vectors[{row}][{col}] = {float(arr[row, col])!r} overflows {dtype.name}")
    return out


def check_dim(dim: object) -> int:
    """Validate a feature dimension."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= int(dim) <= MAX_DIM:
        raise InvalidFeatureError(f"dim must be an integer in 1..{MAX_DIM}, got {_show(dim)}")
    return int(dim)


def check_dtype(dtype: object) -> str:
    """Validate a storage dtype; accepts 'float16'/'float32' and the numpy types themselves."""
    if isinstance(dtype, str):
        name: object = dtype
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        name = np.dtype(dtype).name
    else:
        name = None
    if name not in DTYPES:
        raise InvalidFeatureError(f"dtype must be 'float16' or 'float32', got {_show(dtype)}")
    return name


def check_teacher(teacher: object) -> str:
    """Validate a teacher name: it becomes the readable head of the feature-set id."""
    if not isinstance(teacher, str) or not _TEACHER.fullmatch(teacher):
        raise InvalidFeatureError(
            "teacher must be 1-64 characters of letters, digits, '.', '_' or '-' "
            f"(starting with a letter or digit), got {_show(teacher)}"
        )
    return teacher


def check_weights_sha256(weights_sha256: object) -> str:
    """Normalise the weights digest: None or "random-init" mean no weights were loaded."""
    if weights_sha256 is None or weights_sha256 == "random-init":
        return "random-init"
    return check_sha256(weights_sha256, "weights_sha256")


def check_json_value(value: Any, where: str = "preprocessing") -> None:
    """Refuse anything that would not survive a canonical JSON round trip unchanged."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidFeatureError(f"{where} is {value!r}: only finite numbers are allowed")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidFeatureError(f"{where} has a non-string key {_show(key)}")
            check_json_value(item, f"{where}[{key!r}]")
        return
    raise InvalidFeatureError(f"{where} holds a {type(value).__name__}, which is not JSON data")


def check_set_id(set_id: object) -> bytes:
    """Validate the shape of a feature-set id (existence is checked against the store)."""
    if isinstance(set_id, str) and set_id and not _CONTROL.search(set_id):
        try:
            raw = set_id.encode("utf-8")
        except UnicodeEncodeError:
            raw = b""
        if 0 < len(raw) <= MAX_SET_ID_BYTES:
            return raw
    raise InvalidFeatureError(
        f"feature set id must be a printable str of 1-{MAX_SET_ID_BYTES} bytes, got {_show(set_id)}"
    )
