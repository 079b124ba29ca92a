"""The one error of ``lastkd demo`` (a module of its own so the dataset, the embedding and the
command can all raise it without importing each other)."""

from __future__ import annotations

__all__ = ["DemoError"]


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what failed and where to look."""
