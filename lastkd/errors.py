"""The one error base class of lastkd.

Every error lastkd raises on purpose derives from :class:`LastkdError`: it carries a stable
machine-readable ``code`` and the HTTP ``status`` a service answers with, so the services turn any
of them into the same JSON error shape without a table of special cases, and a command-line tool
prints ``message`` and exits with a usage error for a 4xx (the user's mistake) or a failure for a
5xx (ours). Library code raises the most specific subclass it has; it never imports the services.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["LastkdError", "InvalidInputError", "NotFoundError", "ConflictError", "ForbiddenError", "UnavailableError"]


class LastkdError(Exception):
    """Base class: ``code`` (machine-readable), ``status`` (HTTP), ``message`` and extra ``details``.

    Subclasses set class-level defaults; an instance may override both (``code=``/``status=``).
    """

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # instance override of the class default
        if status is not None:
            self.status = status  # type: ignore[misc]  # instance override of the class default
        self.details: dict[str, Any] = details

    def __str__(self) -> str:
        return self.message

    @property
    def user_error(self) -> bool:
        """True when the caller caused it (a 4xx): bad input, unknown name, conflict."""
        return 400 <= self.status < 500


class InvalidInputError(LastkdError, ValueError):
    """Input that does not validate (a field, a file, a body)."""

    code = "invalid_input"
    status = 422


class NotFoundError(LastkdError, LookupError):
    """A named thing (job, feature set, checkpoint, file) that does not exist."""

    code = "not_found"
    status = 404


class ConflictError(LastkdError):
    """The request contradicts what already exists (a reused id with other content)."""

    code = "conflict"
    status = 409


class ForbiddenError(LastkdError, PermissionError):
    """Refused on principle (a path outside the data roots), whatever the caller retries."""

    code = "forbidden"
    status = 403


class UnavailableError(LastkdError):
    """A dependency is down or busy right now; retrying later may work."""

    code = "unavailable"
    status = 503
