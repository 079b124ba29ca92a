"""The teacher throughput engine: decode worker processes -> micro-batched inference -> store.

One :class:`Embedder` owns the model, its device, the preprocessing settings and the feature
set they define. Clips enter through :meth:`Embedder.submit`, which returns a
:class:`concurrent.futures.Future`; the HTTP service awaits those futures, the bulk CLI keeps a
bounded window of them in flight. Both paths therefore run the same code and store the same
vectors for the same clip.

Data flow::

    submit(path) --> ProcessPoolExecutor (spawn/forkserver): sha256 + decode_clip -> uint8 frames
                          | done-callback
                          v
                     inference queue --> one inference thread: wait for up to batch_size clips
                          (max_wait_ms after the first), normalise, forward, average views,
                          one store transaction per batch, resolve the futures

Decoding runs in other processes, so the model thread never waits on it when there are enough
cores, and a decoder that crashes on a hostile file takes down a worker, not the service (the
pool is rebuilt). Worker processes are started with ``forkserver``/``spawn``: CUDA state must
never be inherited through ``fork``. This module imports torch lazily because the workers
unpickle :func:`_decode_clip` from it and have no use for torch.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lastkd.hashing import sha256_file
from lastkd.teacher.clip_ids import clip_id_from_filename
from lastkd.teacher.decode_worker import init_decode_worker
from lastkd.teacher.failures import ClipFailure, ClipFailureReason, clip_id_conflict
from lastkd.teacher.video import PreprocessConfig, VideoError, VideoLimits, decode_clip, normalize

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lastkd.featurestore import FeatureSetMeta, FeatureStore
    from lastkd.services.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "EmbedResult",
    "Embedder",
    "EngineConfig",
    "EngineError",
    "default_decode_workers",
    "limits_from_settings",
    "planned_set_id",
    "preprocess_from_settings",
    "preprocessing_record",
]

RANDOM_INIT = "random-init"


class EngineError(RuntimeError):
    """The engine cannot start: bad model name, missing weights, unusable device, store conflict."""


@dataclass(frozen=True)
class EmbedResult:
    """Where a clip's feature now lives. ``cached`` means no forward pass was needed."""

    clip_id: str
    sha256: str
    feature_set: str
    dim: int
    cached: bool
    # Distinct real frames of the clip the feature was computed from (below num_frames when
    # the clip is shorter and frames were repeated); stored with the vector and answered again
    # for cached clips (None only for clips stored before it was recorded).
    frames_used: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs (the plain-object form of the teacher_* settings)."""

    model_name: str = "videomae_v2_vit_b"
    weights: Path | None = None
    random_init: bool = False
    device: str = "auto"
    precision: str = "bf16"  # autocast dtype on CUDA; CPU always runs fp32
    batch_size: int = 8
    max_wait_ms: int = 20
    decode_workers: int = 0  # 0 = default_decode_workers(device)
    store_dtype: str = "float32"
    seed: int = 0  # random-init teachers are seeded so that the same set id means the same weights

    def __post_init__(self) -> None:
        # The one place the engine settings are judged, before any model or store is touched:
        # `lastkd embed` and `lastkd serve-teacher` both build this first and print the same
        # message (exit 2) when it refuses.
        from lastkd.models.videomae import check_model_name

        try:
            check_model_name(self.model_name)
        except ValueError as exc:
            raise EngineError(f"cannot build teacher {self.model_name!r}: {exc}") from None
        if self.weights is None and not self.random_init:
            raise EngineError(
                f"no teacher weights configured for {self.model_name!r}: set LASTKD_TEACHER_WEIGHTS to an "
                "official VideoMAE V2 checkpoint (.pth or .safetensors), or set LASTKD_TEACHER_RANDOM_INIT=true "
                "to run a randomly initialised teacher (tests and demos only; its features are labelled random-init)"
            )
        if self.weights is not None and self.random_init:
            raise EngineError("teacher weights and random_init are both set; choose one")
        if self.batch_size < 1:
            raise EngineError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_wait_ms < 0:
            raise EngineError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EngineConfig:
        """The teacher_* fields of the typed Settings, with optional overrides (CLI flags)."""
        values: dict[str, Any] = dict(
            model_name=settings.teacher_model,
            weights=settings.teacher_weights,
            random_init=settings.teacher_random_init,
            device=settings.teacher_device,
            batch_size=settings.teacher_batch_size,
            max_wait_ms=settings.teacher_max_wait_ms,
            decode_workers=settings.decode_workers,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def limits_from_settings(settings: Settings) -> VideoLimits:
    """The input limits (bytes, seconds, pixels) of the typed Settings."""
    return VideoLimits(
        max_bytes=settings.max_upload_bytes,
        max_seconds=settings.max_clip_seconds,
        max_pixels=settings.max_clip_pixels,
        min_frames=settings.min_clip_frames,
    )


def preprocess_from_settings(
    settings: Settings, sampling: str | None = None, protocol: str | None = None
) -> PreprocessConfig:
    """The sampling / preprocessing of the typed Settings (``teacher_sampling``, ``teacher_protocol``),
    with optional overrides (the ``lastkd embed --sampling/--protocol`` flags).

    The service and the bulk CLI both build their PreprocessConfig here, so the same settings
    give the same feature-set id and the same vectors on either path. The official extraction
    squashes the whole frame, so with multiview sampling it has one spatial view per window.
    """
    protocol = protocol or settings.teacher_protocol
    crops = {"spatial_crops": 1} if protocol == "official_extraction" else {}
    return PreprocessConfig(sampling=sampling or settings.teacher_sampling, protocol=protocol, **crops)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_decode_workers(device_type: str) -> int:
    """One decoder per core with a GPU; on CPU the model needs cores too, so half of them."""
    cores = available_cores()
    return max(1, cores if device_type == "cuda" else cores // 2)


def preprocessing_record(preprocess: PreprocessConfig) -> dict[str, Any]:
    """What goes into the feature-set id besides teacher and weights (the model is built with
    the preprocessing's frame count and size, recorded explicitly)."""
    return {**preprocess.as_dict(), "model_num_frames": preprocess.num_frames, "model_img_size": preprocess.size}


def planned_set_id(config: EngineConfig, preprocess: PreprocessConfig) -> str:
    """The feature-set id an engine with these settings will write to, without building it
    (hashes the weights file when there is one)."""
    from lastkd.featurestore import FeatureStoreError, feature_set_id

    weights_sha = None
    if config.weights is not None:
        try:
            weights_sha = sha256_file(config.weights)
        except OSError as exc:
            raise EngineError(f"cannot read teacher weights {config.weights}: {exc.strerror or exc}") from None
    try:
        return feature_set_id(config.model_name, weights_sha, preprocessing_record(preprocess))
    except FeatureStoreError as exc:
        raise EngineError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# decode workers (run in other processes)
# --------------------------------------------------------------------------------------------


def _ping() -> int:
    return os.getpid()


def _decode_clip(
    path: str, cfg: PreprocessConfig, limits: VideoLimits, threads: int, want_sha: bool
) -> tuple[Any, ...]:
    """Worker body: ("ok", frames uint8 (V,T,S,S,3), sha256|None, frames_used) or ("error", reason, message).

    Errors are returned, not raised: exception classes with custom constructors do not always
    survive pickling back to the parent.
    """
    try:
        sha = sha256_file(path) if want_sha else None
        clip = decode_clip(Path(path), cfg, limits, threads=threads)
        return ("ok", np.ascontiguousarray(clip.views), sha, clip.frames_used)
    except VideoError as exc:
        return ("error", str(exc.reason), str(getattr(exc, "message", exc)))
    except MemoryError:
        return ("error", "too_large", "decoding this clip needs more memory than is available")
    except OSError as exc:
        return ("error", "decode_failed", f"cannot read the clip: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - a decoder bug must become a per-clip error
        return ("error", "decode_failed", f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    clip_id: str | None
    sha256: str | None
    future: cf.Future
    frames: np.ndarray | None = None
    frames_used: int | None = None
    source_id: str | None = None  # copy this stored vector instead of computing (same bytes)
    path: str = ""


@dataclass
class _Counters:
    computed: int = 0
    cached: int = 0
    failed: int = 0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)


_STOP = object()


class Embedder:
    """Embeds clips with one teacher into one feature set; thread-safe ``submit``.

    ``on_batch(clips, seconds)`` is called after each inference batch (metrics hook).
    Use as a context manager or call :meth:`start` / :meth:`close`. ``model`` replaces the
    registry model (random-init only; its feature set is named by ``config.model_name``).
    """

    def __init__(
        self,
        config: EngineConfig,
        preprocess: PreprocessConfig,
        limits: VideoLimits,
        store: FeatureStore,
        on_batch: Callable[[int, float], None] | None = None,
        model: Any = None,
    ) -> None:
        if model is not None and not config.random_init:
            raise EngineError("a prebuilt model is only accepted for random-init teachers (benchmarks)")
        self.config = config
        self.preprocess = preprocess
        self.limits = limits
        self.store = store
        self.on_batch = on_batch
        self.counters = _Counters()

        self.model: Any = None
        self._prebuilt = model  # e.g. a shallower ViT-B for quick benchmarks; named by config.model_name
        self.device: Any = None
        self.weights_sha256: str | None = None
        self.set_id: str = ""
        self.dim: int = 0
        self.decode_workers = 0
        self._decode_threads = 1
        self.ready = False

        self._pool: cf.ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._s_per_clip = 0.0  # moving average of inference seconds per clip
        # CPU core sharing between the decoders and the model (see _share_cores).
        self._decoding = 0  # decode tasks submitted and not finished
        self._decoding_lock = threading.Lock()
        self._cpu_threads = 0  # the model's torch threads when no decoder runs (0 = not CPU)
        self._threads_now = 0
        self._hooks: list[Any] = []

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Embedder:
        """Build the model, load weights, open the feature set, start decoders and the inference thread."""
        self._build_model()
        self._open_feature_set()
        self.decode_workers = self.config.decode_workers or default_decode_workers(self.device.type)
        cores = available_cores()
        # With a GPU, cores the decoders leave idle go to FFmpeg's own threads; on CPU the model
        # owns them and extra decoder threads would only preempt its OpenMP threads.
        self._decode_threads = max(1, cores // self.decode_workers) if self.device.type == "cuda" else 1
        if self.device.type == "cpu":
            self._install_core_sharing()
        self._pool = self._new_pool()
        self._thread = threading.Thread(target=self._inference_loop, name="teacher-inference", daemon=True)
        self._thread.start()
        return self

    def warm_up(self) -> None:
        """One forward pass on a blank clip and one task per decoder process, so the first request
        pays neither for lazy CUDA/oneDNN initialisation nor for starting processes."""
        import torch

        from lastkd.models.videomae import inference_context

        size, frames = self.preprocess.size, self.preprocess.num_frames
        x = torch.zeros((1, 3, frames, size, size), device=self.device)
        with inference_context(self.device, self.config.precision):
            out = self.model.embed(x)
        if tuple(out.shape) != (1, self.dim) or not bool(torch.isfinite(out.float()).all()):
            raise EngineError(f"warm-up forward produced {tuple(out.shape)} or non-finite values")
        pool = self._current_pool()
        cf.wait([pool.submit(_ping) for _ in range(self.decode_workers)], timeout=300)
        self.ready = True

    def close(self) -> None:
        """Stop accepting clips, finish the batch in progress, fail what is left, stop the workers."""
        if self._closed:
            return
        self._closed = True
        self.ready = False
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        # Anything still queued after the stop marker never reached the model.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Item):
                self._fail(
                    item,
                    ClipFailure(
                        ClipFailureReason.SHUTDOWN, "the teacher engine shut down before this clip was embedded"
                    ),
                )

    def __enter__(self) -> Embedder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Clips submitted and not yet resolved (decoding, queued or in a batch)."""
        return self._pending

    @property
    def alive(self) -> bool:
        """True while the inference thread runs and the engine is not closed."""
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def seconds_per_clip(self) -> float:
        """Recent inference seconds per clip (0 before the first batch)."""
        return self._s_per_clip

    def meta(self) -> FeatureSetMeta:
        """The metadata of this engine's feature set (count included)."""
        return self.store.get_set(self.set_id)

    # ---- submitting ---------------------------------------------------------------------------

    def lookup_sha256(self, sha256: str) -> str | None:
        """The clip id already stored for these bytes in this feature set, else None."""
        return self.store.lookup_sha256(self.set_id, sha256)

    def submit(self, path: str | os.PathLike[str], clip_id: str | None = None, sha256: str | None = None) -> cf.Future:
        """Embed one clip file; the future resolves to an :class:`EmbedResult` or raises ClipFailure.

        ``clip_id`` defaults to the NTU sample name of the file name, else the content sha256.
        With ``sha256`` given (the service hashes while receiving), bytes already in the set are
        answered from the store without decoding. The file must stay in place until the future
        is done.
        """
        if self._closed or self._pool is None:
            raise EngineError("the engine is not running")
        future: cf.Future = cf.Future()
        path = os.fspath(path)
        if clip_id is None:
            clip_id = clip_id_from_filename(Path(path).name)
        item = _Item(clip_id=clip_id, sha256=sha256, future=future, path=path)
        with self._pending_lock:
            self._pending += 1
        future.add_done_callback(self._release)

        if sha256 is not None:
            known = self.store.lookup_sha256(self.set_id, sha256)
            if item.clip_id is None:
                item.clip_id = known or sha256
            # Fast answers before any decoding. They only ever refuse or answer "cached"; the
            # decision to store is taken in the write transaction (Store.put_if_absent), so
            # concurrent submissions of one id for different bytes cannot both be stored.
            present, held = self.store.clip_sha256(self.set_id, item.clip_id)
            if present and held == sha256:
                self.counters.add(cached=1)
                item.frames_used = self._stored_frames_used(item.clip_id)
                future.set_result(self._result(item, cached=True))
                return future
            if present:
                self._fail(item, clip_id_conflict(item.clip_id))
                return future
            if known is not None:
                # Same bytes under a new id: copy the stored vector, no decode, no forward.
                item.source_id = known
                self._queue.put(item)
                return future
        self._submit_decode(item)
        return future

    def _release(self, _: cf.Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _stored_frames_used(self, clip_id: str) -> int | None:
        """The frames_used stored with a clip (None for clips stored before it was recorded)."""
        info = self.store.clip_info(self.set_id, clip_id)
        return None if info is None else info.get("frames_used")

    def _result(self, item: _Item, cached: bool) -> EmbedResult:
        assert item.clip_id is not None and item.sha256 is not None
        return EmbedResult(item.clip_id, item.sha256, self.set_id, self.dim, cached, item.frames_used)

    def _fail(self, item: _Item, failure: BaseException) -> None:
        self.counters.add(failed=1)
        if not item.future.done():
            item.future.set_exception(failure)

    # ---- decoding -----------------------------------------------------------------------------

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        return cf.ProcessPoolExecutor(
            max_workers=self.decode_workers,
            mp_context=multiprocessing.get_context(method),
            initializer=init_decode_worker,
            initargs=(os.getpid(),),
        )

    def _current_pool(self) -> cf.ProcessPoolExecutor:
        with self._pool_lock:
            assert self._pool is not None
            return self._pool

    def _restart_pool(self, broken: cf.ProcessPoolExecutor) -> None:
        with self._pool_lock:
            if self._pool is broken and not self._closed:
                log.warning("a decoder process died; starting a new decoder pool")
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def _submit_decode(self, item: _Item) -> None:
        args = (_decode_clip, item.path, self.preprocess, self.limits, self._decode_threads, item.sha256 is None)
        pool = self._current_pool()
        try:
            task = pool.submit(*args)
        except BrokenProcessPool:
            self._restart_pool(pool)
            pool = self._current_pool()
            try:
                task = pool.submit(*args)
            except RuntimeError as exc:  # the new pool died or was shut down at once
                self._fail(
                    item, ClipFailure(ClipFailureReason.SHUTDOWN, f"the teacher engine is shutting down ({exc})")
                )
                return
        except RuntimeError as exc:  # pool shut down while submitting
            self._fail(item, ClipFailure(ClipFailureReason.SHUTDOWN, f"the teacher engine is shutting down ({exc})"))
            return
        with self._decoding_lock:
            self._decoding += 1
        task.add_done_callback(lambda done: self._decoded(item, pool, done))

    def _decoded(self, item: _Item, pool: cf.ProcessPoolExecutor, task: cf.Future) -> None:
        with self._decoding_lock:
            self._decoding -= 1
        if task.cancelled():
            self._fail(
                item,
                ClipFailure(ClipFailureReason.SHUTDOWN, "the teacher engine shut down before this clip was decoded"),
            )
            return
        exc = task.exception()
        if isinstance(exc, BrokenProcessPool):
            self._restart_pool(pool)
            self._fail(
                item,
                ClipFailure(
                    ClipFailureReason.DECODE_CRASHED,
                    "the decoder process crashed on this clip (or on one decoded beside it)",
                ),
            )
            return
        if exc is not None:
            self._fail(item, ClipFailure(ClipFailureReason.DECODE_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        outcome = task.result()
        if outcome[0] == "error":
            self._fail(item, ClipFailure(outcome[1], outcome[2]))
            return
        _, frames, sha, item.frames_used = outcome
        if item.sha256 is None:
            item.sha256 = sha
        if item.clip_id is None:
            item.clip_id = item.sha256
        item.frames = frames
        self._queue.put(item)

    # ---- inference ----------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        wait_s = self.config.max_wait_ms / 1000.0
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch: list[_Item] = [first]
            deadline = time.monotonic() + wait_s
            while len(batch) < self.config.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - the failure belongs to the clips, not the thread
                log.exception("inference batch of %d clip(s) failed", len(batch))
                for item in batch:
                    self._fail(item, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        # Bytes that reached the set since they were submitted (a twin in the same burst) are copied.
        for item in batch:
            if item.source_id is None and item.sha256 is not None:
                known = self.store.lookup_sha256(self.set_id, item.sha256)
                if known is not None:
                    item.source_id = known
                    item.frames = None
        compute = [item for item in batch if item.source_id is None]
        copies = [item for item in batch if item.source_id is not None]

        vectors: dict[int, np.ndarray] = {}
        if compute:
            for item, vec in zip(compute, self._forward([item.frames for item in compute]), strict=True):
                vectors[id(item)] = vec
        if copies:
            arr, found = self.store.get_many(self.set_id, [item.source_id for item in copies])
            for item, row, ok in zip(copies, arr, found, strict=True):
                if ok:
                    vectors[id(item)] = np.asarray(row, dtype=np.float32)
                    item.frames_used = self._stored_frames_used(item.source_id)  # same bytes, same frames
                else:  # the source vanished (set deleted meanwhile): nothing to copy
                    self._fail(
                        item,
                        ClipFailure(ClipFailureReason.DECODE_FAILED, "the cached feature for these bytes disappeared"),
                    )

        # One transaction decides every id of the batch: the first clip naming an id is stored,
        # a later one with the same bytes shares it, one with other bytes is a conflict.
        stored = [item for item in batch if id(item) in vectors]
        outcome: list[str] = []
        if stored:
            outcome = self.store.put_if_absent(
                self.set_id,
                [item.clip_id for item in stored],
                np.stack([vectors[id(item)] for item in stored]),
                sha256s=[item.sha256 for item in stored],
                infos=[None if item.frames_used is None else {"frames_used": item.frames_used} for item in stored],
            )
        for item, status in zip(stored, outcome, strict=True):
            if status == "conflict":
                self._fail(item, clip_id_conflict(item.clip_id))
            elif not item.future.done():
                cached = item.source_id is not None or status == "same"
                self.counters.add(**({"cached": 1} if cached else {"computed": 1}))
                item.future.set_result(self._result(item, cached=cached))
        for item in batch:
            item.frames = None

        elapsed = time.perf_counter() - start
        self.counters.add(batches=1)
        if compute:
            per_clip = elapsed / len(compute)
            self._s_per_clip = per_clip if self._s_per_clip == 0 else 0.8 * self._s_per_clip + 0.2 * per_clip
        if self.on_batch is not None:
            self.on_batch(len(batch), elapsed)

    def _forward(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Features (float32, dim) per clip: views flattened into rows, run in chunks of
        batch_size rows, then averaged back per clip."""
        import torch

        from lastkd.models.videomae import inference_context

        views = [c.shape[0] for c in clips]
        rows = np.concatenate(clips, axis=0) if len(clips) > 1 else clips[0]
        outputs: list[torch.Tensor] = []
        # On a GPU a batch fills the device. On a CPU one clip is already 1568 tokens, plenty for
        # the GEMMs (batch 4 measured no faster per clip than batch 1), while a batch multiplies
        # the activations past glibc's mmap threshold (fresh pages, page faults, every block)
        # and makes each block too long for _share_cores to react to a decoder starting.
        step = self.config.batch_size if self.device.type == "cuda" else 1
        with inference_context(self.device, self.config.precision):
            for lo in range(0, rows.shape[0], step):
                x = torch.as_tensor(normalize(rows[lo : lo + step], self.preprocess))
                x = x.to(self.device, non_blocking=True)
                outputs.append(self.model.embed(x).float().cpu())
        if self._threads_now != self._cpu_threads:  # leave the process-wide setting as found
            torch.set_num_threads(self._cpu_threads)
            self._threads_now = self._cpu_threads
        feats = torch.cat(outputs).numpy()
        out, lo = [], 0
        for v in views:
            out.append(
                feats[lo : lo + v].mean(axis=0, dtype=np.float64).astype(np.float32) if v > 1 else feats[lo].copy()
            )
            lo += v
        return out

    # ---- CPU core sharing ---------------------------------------------------------------------

    def _install_core_sharing(self) -> None:
        """Give the model every core a decoder is not using, re-decided before each block.

        On a CPU the decoder processes and the model's OpenMP threads compete for the same cores.
        An OpenMP team runs at the pace of its slowest thread, so a decoder preempting one model
        thread stalls the whole team (and its partner spins at the barrier). Instead, while k
        decoders run the model uses ``cores - k`` threads, and all cores again once they are idle.
        """
        import torch

        self._cpu_threads = torch.get_num_threads()
        self._threads_now = self._cpu_threads
        blocks = getattr(self.model, "blocks", None)
        if blocks is None:
            return
        self._hooks = [blk.register_forward_pre_hook(self._share_cores) for blk in blocks]

    def _share_cores(self, *_: Any) -> None:
        busy = min(self._decoding, self.decode_workers)
        want = max(1, self._cpu_threads - busy)
        if want != self._threads_now:
            import torch

            # torch.set_num_threads acts on this (the inference) thread's OpenMP team and MKL.
            torch.set_num_threads(want)
            self._threads_now = want

    # ---- model and feature set ----------------------------------------------------------------

    def _build_model(self) -> None:
        import torch

        from lastkd.devices import resolve_device
        from lastkd.models.checkpoint_io import load_checkpoint
        from lastkd.models.videomae import create_videomae

        cfg = self.config
        try:
            self.device = resolve_device(cfg.device)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        if self._prebuilt is not None:
            self.model = self._prebuilt.eval().requires_grad_(False).to(self.device)
            self.dim = int(self.model.embed_dim)
            return
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = create_videomae(
                    cfg.model_name, num_frames=self.preprocess.num_frames, img_size=self.preprocess.size, num_classes=0
                )
        except (ValueError, TypeError) as exc:
            raise EngineError(f"cannot build teacher {cfg.model_name!r}: {exc}") from None
        if cfg.weights is not None:
            weights = Path(cfg.weights)
            if not weights.is_file():
                raise EngineError(f"teacher weights not found: {weights}")
            try:
                self.weights_sha256 = load_checkpoint(model, weights)
            except (ValueError, OSError, RuntimeError) as exc:
                raise EngineError(f"cannot load teacher weights {weights}: {exc}") from None
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        self.dim = int(model.embed_dim)

    def _open_feature_set(self) -> None:
        from lastkd.featurestore import FeatureStoreError, feature_set_id

        teacher = self.config.model_name
        prep = preprocessing_record(self.preprocess)
        try:
            self.set_id = feature_set_id(teacher, self.weights_sha256, prep)
            meta = self.store.create_set(
                teacher=teacher,
                weights_sha256=self.weights_sha256,
                preprocessing=prep,
                dim=self.dim,
                dtype=self.config.store_dtype,
            )
        except FeatureStoreError as exc:
            raise EngineError(f"cannot open the feature set for {teacher!r}: {exc}") from None
        if meta.set_id != self.set_id or meta.dim != self.dim:
            raise EngineError(
                f"feature set {meta.set_id!r} (dim {meta.dim}) does not match this teacher (dim {self.dim})"
            )
