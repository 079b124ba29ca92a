"""The decoder processes: clip file -> sha256 + uint8 frames, in a pool rebuilt when one dies.

Decoding runs in other processes, so the inference thread never waits on it when there are
enough cores, and a decoder that crashes on a hostile file takes down a worker, not the
service: :class:`DecoderPool` replaces a broken pool and reports the clips it lost as
``decode_crashed``. Workers are started with ``forkserver`` (``spawn`` where there is none):
CUDA state must never be inherited through ``fork``. Each worker first runs
:func:`~lastkd.teacher.decode_worker.init_decode_worker`, which ties its life to the pool's
owner. The workers unpickle :func:`_decode_clip` from this module, so it imports neither the
model nor the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lastkd.hashing import sha256_file
from lastkd.teacher.decode_worker import init_decode_worker
from lastkd.teacher.failures import ClipFailure, ClipFailureReason
from lastkd.teacher.video import Box, PreprocessConfig, VideoError, VideoLimits, decode_clip

log = logging.getLogger(__name__)

__all__ = [
    "DecodedClip",
    "DecoderPool",
    "available_cores",
    "decode_threads",
    "default_decode_workers",
]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_decode_workers(device_type: str) -> int:
    """One decoder per core with a GPU; on CPU the model needs cores too, so half of them."""
    cores = available_cores()
    return max(1, cores if device_type == "cuda" else cores // 2)


def decode_threads(workers: int, device_type: str) -> int:
    """FFmpeg threads per decoder process."""
    # With a GPU, cores the decoders leave idle go to FFmpeg's own threads; on CPU the model
    # owns them and extra decoder threads would only preempt its OpenMP threads.
    return max(1, available_cores() // workers) if device_type == "cuda" else 1


@dataclass(frozen=True)
class DecodedClip:
    """A decoded clip: uint8 frames (views, T, S, S, 3), the file's sha256 when asked, and the
    number of distinct real frames (below T when a short clip's frames were repeated)."""

    frames: np.ndarray
    sha256: str | None
    frames_used: int


@dataclass(frozen=True)
class _DecodeRefused:
    """A worker's per-clip failure, as plain data.

    Returned rather than raised: exception classes with custom constructors do not always
    survive pickling back to the parent.
    """

    reason: str
    message: str


# --------------------------------------------------------------------------------------------
# worker bodies (run in the decoder processes)
# --------------------------------------------------------------------------------------------


def _ping() -> int:
    return os.getpid()


def _person_box(skeleton: str | None, pad: float) -> Box | _DecodeRefused:
    """The person box of a clip from its .skeleton file, or why there is none."""
    from lastkd.ntu.skeleton import SkeletonParseError, color_boxes, person_box

    if skeleton is None:
        return _DecodeRefused("no_skeleton", "person crop needs the clip's NTU sample name to find its .skeleton file")
    try:
        box = person_box(color_boxes(skeleton), pad)
    except FileNotFoundError:
        return _DecodeRefused("no_skeleton", f"no skeleton file {Path(skeleton).name} for the person crop")
    except (OSError, SkeletonParseError) as exc:
        return _DecodeRefused("no_skeleton", f"cannot read the skeleton file for the person crop: {exc}")
    if box is None:
        return _DecodeRefused("no_skeleton", f"{Path(skeleton).name} has no body in any frame: nothing to crop to")
    return box


def _decode_clip(
    path: str,
    cfg: PreprocessConfig,
    limits: VideoLimits,
    threads: int,
    want_sha: bool,
    skeleton: str | None = None,
    decoder: str = "cpu",
) -> DecodedClip | _DecodeRefused:
    """Worker body: the decoded clip, or why it cannot be decoded (never raises). ``skeleton``:
    the clip's .skeleton file, read for the person box when the preprocessing has person_crop."""
    try:
        box = None
        if cfg.person_crop:
            found = _person_box(skeleton, cfg.crop_pad)
            if isinstance(found, _DecodeRefused):
                return found
            box = found
        sha = sha256_file(path) if want_sha else None
        clip = decode_clip(Path(path), cfg, limits, threads=threads, box=box, decoder=decoder)
        return DecodedClip(np.ascontiguousarray(clip.views), sha, clip.frames_used)
    except VideoError as exc:
        return _DecodeRefused(str(exc.reason), str(getattr(exc, "message", exc)))
    except MemoryError:
        return _DecodeRefused("too_large", "decoding this clip needs more memory than is available")
    except OSError as exc:
        return _DecodeRefused("decode_failed", f"cannot read the clip: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - a decoder bug must become a per-clip error
        return _DecodeRefused("decode_failed", f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# the pool (in the engine's process)
# --------------------------------------------------------------------------------------------


def _shutting_down(exc: BaseException) -> ClipFailure:
    return ClipFailure(ClipFailureReason.SHUTDOWN, f"the teacher engine is shutting down ({exc})")


class DecoderPool:
    """``workers`` decoder processes for one preprocessing and one set of limits.

    :meth:`decode` is thread-safe and reports each clip exactly once to its callback, as a
    :class:`DecodedClip` or a :class:`ClipFailure`. Use :meth:`start` / :meth:`close`.
    """

    def __init__(
        self, workers: int, threads: int, preprocess: PreprocessConfig, limits: VideoLimits, decoder: str = "cpu"
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.preprocess = preprocess
        self.limits = limits
        self.decoder = decoder  # cpu or nvdec (checked by the engine before the pool starts)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> DecoderPool:
        """Create the process pool (its processes start with the first tasks)."""
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
        return self

    def ping_all(self, timeout: float = 300) -> None:
        """One task per worker, so the first clips do not pay for starting processes."""
        pool = self.current()
        cf.wait([pool.submit(_ping) for _ in range(self.workers)], timeout=timeout)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, stop the processes; no restart after."""
        with self._lock:
            self._closed = True
            pool = self._pool
        # Outside the lock: the shutdown waits for done-callbacks, which take it to restart.
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def current(self) -> cf.ProcessPoolExecutor:
        """The live process pool (a new one after a crash)."""
        with self._lock:
            if self._pool is None:
                raise RuntimeError("the decoder pool is not started")
            return self._pool

    def decode(
        self,
        path: str,
        want_sha: bool,
        on_done: Callable[[DecodedClip | ClipFailure], None],
        skeleton: str | None = None,
    ) -> None:
        """Decode ``path`` in a worker (hashing it too when ``want_sha``; its person box from
        ``skeleton`` with person_crop); ``on_done`` gets the outcome, from this thread when the
        clip cannot be submitted, else from the pool's."""
        pool = self.current()
        try:
            task = self._submit(pool, path, want_sha, skeleton)
        except BrokenProcessPool:
            self._restart(pool)
            pool = self.current()
            try:
                task = self._submit(pool, path, want_sha, skeleton)
            except RuntimeError as exc:  # the new pool died or was shut down at once
                on_done(_shutting_down(exc))
                return
        except RuntimeError as exc:  # pool shut down while submitting
            on_done(_shutting_down(exc))
            return
        task.add_done_callback(lambda done: on_done(self._outcome(pool, done)))

    def _submit(
        self, pool: cf.ProcessPoolExecutor, path: str, want_sha: bool, skeleton: str | None
    ) -> cf.Future[DecodedClip | _DecodeRefused]:
        return pool.submit(
            _decode_clip, path, self.preprocess, self.limits, self.threads, want_sha, skeleton, self.decoder
        )

    def _outcome(
        self, pool: cf.ProcessPoolExecutor, task: cf.Future[DecodedClip | _DecodeRefused]
    ) -> DecodedClip | ClipFailure:
        if task.cancelled():
            return ClipFailure(ClipFailureReason.SHUTDOWN, "the teacher engine shut down before this clip was decoded")
        exc = task.exception()
        if isinstance(exc, BrokenProcessPool):
            self._restart(pool)
            return ClipFailure(
                ClipFailureReason.DECODE_CRASHED,
                "the decoder process crashed on this clip (or on one decoded beside it)",
            )
        if exc is not None:
            return ClipFailure(ClipFailureReason.DECODE_FAILED, f"{type(exc).__name__}: {exc}")
        outcome = task.result()
        if isinstance(outcome, _DecodeRefused):
            return ClipFailure(outcome.reason, outcome.message)
        return outcome

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context(method),
            initializer=init_decode_worker,
            initargs=(os.getpid(),),
        )

    def _restart(self, broken: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            # Only the first clip to see a broken pool replaces it; the others find it replaced.
            if self._pool is broken and not self._closed:
                log.warning("a decoder process died; starting a new decoder pool")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
