"""The names lastkd hands out or accepts, and the one pattern for each.

They become folder names (registry versions, job run folders) and database keys, so every
entry point checks them here: path syntax, control characters and overlong names never pass.
"""

from __future__ import annotations

import re

__all__ = ["JOB_ID_RE", "NAME_RE", "VERSION_RE", "check_job_id", "check_name", "parse_version"]

# Registry names of published students (and experiments): <registry>/<name>/v<N>/.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Job ids: server-made (uuid4 hex), client-chosen (POST /train "job_id") or the CLI's
# "cli-<name>-<config hash>"; each is a run folder under the jobs dir.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Versions as written in URLs and folders: "v3" (or "3" in a URL).
VERSION_RE = re.compile(r"^v?([1-9][0-9]{0,8})$")


def check_name(value: str) -> str:
    """``value`` when it is a valid registry name, else ValueError saying what is allowed."""
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        raise ValueError("must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit")
    return value


def check_job_id(value: str) -> str:
    """``value`` when it is a valid job id, else ValueError saying what is allowed."""
    if not isinstance(value, str) or not JOB_ID_RE.match(value) or ".." in value:
        raise ValueError("must be 1-128 characters of letters, digits, '_', '-', '.', starting with a letter or digit")
    return value


def parse_version(text: str) -> int | None:
    """The version number of ``v3`` / ``3``, or None when ``text`` is not a version."""
    match = VERSION_RE.match(text) if isinstance(text, str) else None
    return int(match.group(1)) if match else None
