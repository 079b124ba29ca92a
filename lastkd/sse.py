"""Server-sent events: the one writer (the services) and the one reader (client, demo, tests).

Only what lastkd sends is supported: ``event:`` and ``data:`` lines (data is one JSON document),
``retry:`` and comment lines, events separated by a blank line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "format_event", "format_comment", "parse_events"]


@dataclass(frozen=True)
class Event:
    """One server-sent event: its name and its JSON payload."""

    event: str
    data: Any


def format_event(event: str, data: Any) -> str:
    """The wire form of one event whose payload is ``data`` as compact JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


def format_comment(text: str = "keep-alive") -> str:
    """A comment line, which clients ignore (keeps idle connections open through proxies)."""
    return f": {text}\n\n"


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from the lines of a stream (``httpx.Response.iter_lines()``).

    A ``data:`` line that is not JSON raises ValueError naming the event: the server only sends
    JSON, so anything else means the stream is not a lastkd event stream.
    """
    name, data = "message", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    raise ValueError(f"event {name!r} carries data that is not JSON: {text[:80]!r}") from None
                yield Event(name, payload)
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
