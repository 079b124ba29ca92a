"""Receiving clip uploads: stream a multipart body to temporary files under hard limits.

The body is parsed as it arrives (python-multipart's push parser), each file part goes straight
to its own temporary file and is hashed on the way, so a request is never held in memory and a
request over the size limit is refused with 413 as soon as the limit is crossed (or before a
byte is read, when Content-Length already says so). Whatever happens, a failed receive leaves
no file behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from lastkd.errors import LastkdError

__all__ = ["ReceivedForm", "UploadError", "UploadedFile", "receive_multipart"]

FILE_FIELD = "files"
ID_FIELD = "clip_ids"
MAX_FIELD_BYTES_TOTAL = 64 * 1024  # all non-file fields together (clip ids are <= 128 chars each)
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class UploadError(LastkdError):
    """The request body cannot be accepted; ``status`` and ``code`` go to the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code, status=status)


@dataclass
class UploadedFile:
    """One received file part, on disk under a private temporary name."""

    filename: str
    path: Path
    size: int
    sha256: str


@dataclass
class ReceivedForm:
    """The files (in order) and the text fields of a request."""

    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, list[str]] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Delete every temporary file."""
        for f in self.files:
            f.path.unlink(missing_ok=True)


def _extended_filename(disposition: bytes) -> str | None:
    """The ``filename*=charset'lang'percent-encoded`` parameter (RFC 2231/5987), decoded, or None.

    python-multipart drops extended parameters (RFC 7578 prefers the plain ``filename``, which
    wins when both are sent), but clients such as curl and browsers in some modes send only the
    extended form for non-ASCII names.
    """
    for segment in disposition.decode("latin-1").split(";")[1:]:
        key, _, value = segment.strip().partition("=")
        if key.strip().lower() != "filename*":
            continue
        value = value.strip().strip('"')
        charset, _, rest = value.partition("'")
        _, quoted, encoded = rest.partition("'")
        if not quoted:
            raise UploadError(
                400,
                "malformed_multipart",
                "filename* must have the RFC 2231 form charset'language'percent-encoded-name "
                "(e.g. UTF-8''vid%C3%A9o.mp4)",
            )
        try:
            return unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise UploadError(
                400, "malformed_multipart", f"filename* is not a valid {charset[:20]!r}-encoded name"
            ) from None
    return None


class _Receiver:
    """python-multipart callbacks that write file parts to disk and keep text fields."""

    def __init__(self, tmp_dir: Path, max_bytes: int, max_files: int) -> None:
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.form = ReceivedForm()
        self.field_bytes = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._filename: str | None = None
        self._fh: IO[bytes] | None = None
        self._path: Path | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._data = bytearray()
        self.ended = False

    # python-multipart callback protocol -------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name, self._filename, self._fh, self._path = "", None, None, None
        self._hash, self._size, self._data = hashlib.sha256(), 0, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadError(400, "malformed_multipart", "a multipart part has no Content-Disposition name")
        self._name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        if filename is None:
            filename = _extended_filename(self._disposition)
        if filename is not None or self._name == FILE_FIELD:
            if self._name != FILE_FIELD:
                raise UploadError(
                    400,
                    "unexpected_field",
                    f"file parts must be sent as {FILE_FIELD!r} fields, got {self._name[:60]!r}",
                )
            if len(self.form.files) >= self.max_files:
                raise UploadError(413, "too_many_files", f"at most {self.max_files} clips may be sent in one request")
            self._filename = filename or ""  # a nameless file part is still a clip (id: its sha256)
            suffix = Path(self._filename.replace("\\", "/")).suffix
            fd, name = tempfile.mkstemp(
                prefix="upload-", suffix=suffix if _SAFE_SUFFIX.match(suffix) else "", dir=self.tmp_dir
            )
            self._path = Path(name)
            self._fh = os.fdopen(fd, "wb")
            # Registered at once so that an abort half-way still deletes this file.
            self.form.files.append(UploadedFile(self._filename, self._path, 0, ""))
        elif self._name != ID_FIELD:
            raise UploadError(
                400,
                "unexpected_field",
                f"unknown form field {self._name[:60]!r}; expected {FILE_FIELD!r} and {ID_FIELD!r}",
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._fh is not None:
            self._fh.write(chunk)
            self._hash.update(chunk)
            self._size += len(chunk)
        else:
            self.field_bytes += len(chunk)
            if self.field_bytes > MAX_FIELD_BYTES_TOTAL:
                raise UploadError(413, "fields_too_large", f"form fields exceed {MAX_FIELD_BYTES_TOTAL} bytes")
            self._data.extend(chunk)

    def on_part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            assert self._path is not None  # set with the file handle in on_part_begin's file branch
            self.form.files[-1] = UploadedFile(self._filename or "", self._path, self._size, self._hash.hexdigest())
        else:
            self.form.fields.setdefault(self._name, []).append(bytes(self._data).decode("utf-8", "replace"))

    def on_end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.form.cleanup()


async def receive_multipart(request: Request, tmp_dir: Path, *, max_bytes: int, max_files: int) -> ReceivedForm:
    """Stream a ``multipart/form-data`` body into temporary files under ``tmp_dir``.

    Accepts file parts named ``files`` and text parts named ``clip_ids``. Raises UploadError:
    415 (not multipart), 413 (body over ``max_bytes``, more than ``max_files`` files, oversized
    text fields), 400 (malformed multipart, unknown fields). The caller owns the returned
    files and must call :meth:`ReceivedForm.cleanup`.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UploadError(
            415, "unsupported_media_type", "send clips as multipart/form-data with one 'files' part per clip"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "malformed_multipart", "the multipart Content-Type has no boundary")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise UploadError(413, "too_large", f"the upload is {int(declared)} bytes; the limit is {max_bytes} bytes")

    receiver = _Receiver(tmp_dir, max_bytes, max_files)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]  # a plain dict of the TypedDict's callbacks
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise UploadError(413, "too_large", f"the upload exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        receiver.abort()
        raise
    except MultipartParseError as exc:
        receiver.abort()
        raise UploadError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc}") from None
    except BaseException:
        receiver.abort()
        raise
    if not receiver.ended:  # a cut-off body: never embed half a file
        receiver.abort()
        raise UploadError(400, "malformed_multipart", "the multipart body ended before its closing boundary")
    return receiver.form
