"""The embedding step of ``lastkd demo``: every clip through the teacher's ``POST /embed``,
several uploads in flight, with a progress line and a summary of what the teacher answered.

Kept apart from the command because it is its own machinery (a thread pool of multipart
uploads, retries while the teacher is busy, per-clip failures collected rather than fatal) and
the command only needs its outcome: one feature set to distil from.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lastkd.services.client import ApiError, retry_after
from lastkd.services.demo_console import Console, fmt_s
from lastkd.services.demo_errors import DemoError

__all__ = ["EmbedSummary", "embed_clips", "error_text"]


@dataclass
class EmbedSummary:
    """What the teacher answered for the demo's clips."""

    feature_set: str | None = None
    embedded: int = 0
    cached: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        """Clips answered so far, whatever the answer."""
        return self.embedded + self.cached + len(self.failed)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def error_text(response: httpx.Response) -> str:
    """A failed answer of a lastkd API as ``code: message`` (for the demo's one-line errors)."""
    err = ApiError.from_response(response)
    return f"{err.code}: {err.message}"


def _post_clips(client: httpx.Client, url: str, clips: list[Path], deadline: float) -> dict[str, Any]:
    """POST one batch of clips, retrying while the teacher says "busy" (503 + Retry-After)."""
    transport_errors = 0
    while True:
        handles = [open(p, "rb") for p in clips]
        try:
            files = [("files", (p.name, h, "video/x-msvideo")) for p, h in zip(clips, handles, strict=True)]
            response = client.post(f"{url}/embed", files=files)
        except httpx.TransportError as exc:
            transport_errors += 1
            if transport_errors > 3 or time.monotonic() > deadline:
                raise DemoError(f"the teacher at {url} did not answer ({type(exc).__name__}: {exc})") from None
            time.sleep(1.0)
            continue
        finally:
            for h in handles:
                h.close()
        if response.status_code == 503 and time.monotonic() < deadline:
            time.sleep(retry_after(response))
            continue
        if response.status_code in (200, 422) and "results" in response.text:
            return response.json()
        raise DemoError(f"POST {url}/embed failed: {error_text(response)}")


def embed_clips(
    teacher_url: str,
    clips: list[Path],
    console: Console,
    *,
    token: str | None = None,
    concurrency: int = 3,
    per_request: int = 2,
    timeout: float = 3600.0,
) -> EmbedSummary:
    """Upload every clip to ``POST /embed`` with ``concurrency`` requests in flight.

    Per-clip failures are collected (the job then trains those samples on CE only); a request
    that fails as a whole raises :class:`DemoError`.
    """
    summary = EmbedSummary()
    batches = [clips[i : i + per_request] for i in range(0, len(clips), per_request)]
    started = time.monotonic()
    deadline = started + timeout
    sets: set[str] = set()
    with (
        httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), headers=_headers(token)) as client,
        cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="embed") as pool,
    ):
        futures = [pool.submit(_post_clips, client, teacher_url, batch, deadline) for batch in batches]
        try:
            for future in cf.as_completed(futures):
                body = future.result()
                for item in body.get("results", []):
                    if "error" in item:
                        err = item["error"]
                        summary.failed[item.get("filename", "?")] = f"{err.get('code')}: {err.get('message')}"
                        continue
                    sets.add(item["feature_set"])
                    if item.get("cached"):
                        summary.cached += 1
                    else:
                        summary.embedded += 1
                elapsed = time.monotonic() - started
                rate = summary.done / elapsed if elapsed > 0 else 0.0
                eta = (len(clips) - summary.done) / rate if rate > 0 else 0.0
                console.progress(
                    f"  embedding: {summary.done}/{len(clips)} clips ({summary.cached} cached, "
                    f"{len(summary.failed)} failed), {rate:.2f} clips/s, ETA {fmt_s(eta)}"
                )
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    summary.seconds = time.monotonic() - started
    if len(sets) > 1:
        raise DemoError(f"the teacher answered with several feature sets ({', '.join(sorted(sets))}); expected one")
    summary.feature_set = next(iter(sets), None)
    console.finish(
        f"  embedded {len(clips)} clips in {fmt_s(summary.seconds)}: {summary.embedded} computed, "
        f"{summary.cached} cached, {len(summary.failed)} failed; feature set {summary.feature_set}"
    )
    for name, reason in sorted(summary.failed.items()):
        console.line(f"  ! {name}: {reason}")
    if summary.feature_set is None:
        raise DemoError("no clip could be embedded; see the messages above")
    return summary
