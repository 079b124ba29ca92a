"""The teacher throughput engine: decoder processes -> micro-batched inference -> store.

One :class:`Embedder` owns the teacher (:mod:`lastkd.teacher.model_loader`), the decoder
processes (:mod:`lastkd.teacher.decoders`), the preprocessing settings and the feature set they
define (:mod:`lastkd.teacher.engine_config`). Clips enter through :meth:`Embedder.submit`, which
returns a :class:`concurrent.futures.Future`; the HTTP service awaits those futures, the bulk
CLI keeps a bounded window of them in flight. Both paths therefore run the same code and store
the same vectors for the same clip.

Data flow::

    submit(path) --> DecoderPool (other processes): sha256 + decode_clip -> uint8 frames
                          | done-callback
                          v
                     inference queue --> one inference thread: wait for up to batch_size clips
                          (max_wait_ms after the first), normalise, forward, average views,
                          one store transaction per batch, resolve the futures

On a CPU the decoders and the model share the cores; the inference thread gives the model the
cores the running decoders leave free (see :meth:`Embedder._install_core_sharing`). torch is
imported lazily, as in the modules this one composes.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lastkd.teacher.clip_ids import clip_id_from_filename
from lastkd.teacher.decoders import DecodedClip, DecoderPool, decode_threads, default_decode_workers
from lastkd.teacher.engine_config import EngineConfig, EngineError, preprocessing_record
from lastkd.teacher.failures import ClipFailure, ClipFailureReason, clip_id_conflict
from lastkd.teacher.model_loader import LoadedTeacher, load_teacher
from lastkd.teacher.video import PreprocessConfig, VideoLimits, check_decoder, normalize

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch.utils.hooks import RemovableHandle

    from lastkd.featurestore import FeatureSetMeta, FeatureStore
    from lastkd.models.videomae import VideoMAEv2

log = logging.getLogger(__name__)

__all__ = ["EmbedResult", "Embedder"]


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


@dataclass
class _Item:
    clip_id: str | None
    sha256: str | None
    future: cf.Future[EmbedResult]
    frames: np.ndarray | None = None
    frames_used: int | None = None
    source_id: str | None = None  # copy this stored vector instead of computing (same bytes)
    path: str = ""

    def ids(self) -> tuple[str, str]:
        """The clip id and sha256, both known once the item reaches the inference queue."""
        assert self.clip_id is not None and self.sha256 is not None
        return self.clip_id, self.sha256


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
        model: VideoMAEv2 | None = None,
    ) -> None:
        if model is not None and not config.random_init:
            raise EngineError("a prebuilt model is only accepted for random-init teachers (benchmarks)")
        self.config = config
        self.preprocess = preprocess
        self.limits = limits
        self.store = store
        self.on_batch = on_batch
        self.counters = _Counters()

        self._prebuilt = model  # e.g. a shallower ViT-B for quick benchmarks; named by config.model_name
        self._teacher: LoadedTeacher | None = None
        self.set_id: str = ""
        self.decode_workers = 0
        self.ready = False

        self._decoders: DecoderPool | None = None
        self._queue: queue.Queue[_Item | None] = queue.Queue()  # None stops the inference thread
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._closed = False
        self._s_per_clip = 0.0  # moving average of inference seconds per clip
        # CPU core sharing between the decoders and the model (see _share_cores).
        self._decoding = 0  # clips handed to the decoders and not reported back
        self._decoding_lock = threading.Lock()
        self._cpu_threads = 0  # the model's torch threads when no decoder runs (0 = not CPU)
        self._threads_now = 0
        self._hooks: list[RemovableHandle] = []

    # ---- the teacher (None before start) ------------------------------------------------------

    @property
    def model(self) -> VideoMAEv2 | None:
        """The teacher model on its device."""
        return None if self._teacher is None else self._teacher.model

    @property
    def device(self) -> torch.device | None:
        """The device the teacher runs on."""
        return None if self._teacher is None else self._teacher.device

    @property
    def dim(self) -> int:
        """The feature dimension (0 before start)."""
        return 0 if self._teacher is None else self._teacher.dim

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the loaded weights file (None for a random-init teacher)."""
        return None if self._teacher is None else self._teacher.weights_sha256

    def _loaded(self) -> LoadedTeacher:
        if self._teacher is None:
            raise EngineError("the engine is not started")
        return self._teacher

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Embedder:
        """Build the model, load weights, open the feature set, start decoders and the inference thread."""
        if self.preprocess.person_crop and (self.config.skeletons is None or not Path(self.config.skeletons).is_dir()):
            raise EngineError(
                "the person crop reads each clip's .skeleton file: set LASTKD_TEACHER_SKELETONS to the folder "
                f"that holds them (now {self.config.skeletons})"
            )
        problem = check_decoder(self.config.decoder)
        if problem is not None:
            raise EngineError(f"LASTKD_TEACHER_DECODE={self.config.decoder}: {problem}")
        teacher = self._teacher = load_teacher(self.config, self.preprocess, self._prebuilt)
        self._open_feature_set()
        device_type = teacher.device.type
        self.decode_workers = self.config.decode_workers or default_decode_workers(device_type)
        if device_type == "cpu":
            self._install_core_sharing()
        threads = decode_threads(self.decode_workers, device_type)
        self._decoders = DecoderPool(
            self.decode_workers, threads, self.preprocess, self.limits, self.config.decoder
        ).start()
        self._thread = threading.Thread(target=self._inference_loop, name="teacher-inference", daemon=True)
        self._thread.start()
        return self

    def warm_up(self) -> None:
        """One forward pass on a blank clip and one task per decoder process, so the first request
        pays neither for lazy CUDA/oneDNN initialisation nor for starting processes."""
        self._loaded().warm_up(self.preprocess.num_frames, self.preprocess.size)
        self._running_decoders().ping_all(timeout=300)
        self.ready = True

    def close(self) -> None:
        """Stop accepting clips, finish the batch in progress, fail what is left, stop the workers."""
        if self._closed:
            return
        self._closed = True
        self.ready = False
        if self._decoders is not None:
            self._decoders.close()
        if self._thread is not None:
            self._queue.put(None)
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
            if item is not None:
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

    def submit(
        self, path: str | os.PathLike[str], clip_id: str | None = None, sha256: str | None = None
    ) -> cf.Future[EmbedResult]:
        """Embed one clip file; the future resolves to an :class:`EmbedResult` or raises ClipFailure.

        ``clip_id`` defaults to the NTU sample name of the file name, else the content sha256.
        With ``sha256`` given (the service hashes while receiving), bytes already in the set are
        answered from the store without decoding. The file must stay in place until the future
        is done.
        """
        if self._closed or self._decoders is None:
            raise EngineError("the engine is not running")
        future: cf.Future[EmbedResult] = cf.Future()
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
        self._submit_decode(self._decoders, item)
        return future

    def _release(self, _: cf.Future[EmbedResult]) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _stored_frames_used(self, clip_id: str) -> int | None:
        """The frames_used stored with a clip (None for clips stored before it was recorded)."""
        info = self.store.clip_info(self.set_id, clip_id)
        return None if info is None else info.get("frames_used")

    def _result(self, item: _Item, cached: bool) -> EmbedResult:
        clip_id, sha256 = item.ids()
        return EmbedResult(clip_id, sha256, self.set_id, self.dim, cached, item.frames_used)

    def _fail(self, item: _Item, failure: BaseException) -> None:
        self.counters.add(failed=1)
        if not item.future.done():
            item.future.set_exception(failure)

    # ---- decoding -----------------------------------------------------------------------------

    def _running_decoders(self) -> DecoderPool:
        if self._decoders is None:
            raise EngineError("the engine is not started")
        return self._decoders

    def _current_pool(self) -> cf.ProcessPoolExecutor:
        """The decoders' live process pool (a new one after a decoder crashed)."""
        return self._running_decoders().current()

    def _submit_decode(self, decoders: DecoderPool, item: _Item) -> None:
        # Counted before the hand-over: the pool reports every clip exactly once, even one it
        # refuses at once, and _decoded uncounts it then.
        with self._decoding_lock:
            self._decoding += 1
        decoders.decode(
            item.path, item.sha256 is None, lambda outcome: self._decoded(item, outcome), self._skeleton_of(item)
        )

    def _skeleton_of(self, item: _Item) -> str | None:
        """The .skeleton file of a clip for the person crop (None: no crop, or no NTU name)."""
        if not self.preprocess.person_crop or self.config.skeletons is None or item.clip_id is None:
            return None
        if clip_id_from_filename(f"{item.clip_id}.skeleton") is None:
            return None  # a sha256 or other id: no skeleton can be named
        return str(Path(self.config.skeletons) / f"{item.clip_id}.skeleton")

    def _decoded(self, item: _Item, outcome: DecodedClip | ClipFailure) -> None:
        with self._decoding_lock:
            self._decoding -= 1
        if isinstance(outcome, ClipFailure):
            self._fail(item, outcome)
            return
        item.frames_used = outcome.frames_used
        if item.sha256 is None:
            item.sha256 = outcome.sha256
        if item.clip_id is None:
            item.clip_id = item.sha256
        item.frames = outcome.frames
        self._queue.put(item)

    # ---- inference ----------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - the failure belongs to the clips, not the thread
                log.exception("inference batch of %d clip(s) failed", len(batch))
                for item in batch:
                    self._fail(item, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))

    def _next_batch(self) -> tuple[list[_Item], bool]:
        """Up to batch_size queued clips, waiting at most max_wait_ms after the first; and
        whether the stop marker was met."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        while len(batch) < self.config.batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        # Bytes that reached the set since they were submitted (a twin in the same burst) are copied.
        for item in batch:
            if item.source_id is None and item.sha256 is not None:
                known = self.store.lookup_sha256(self.set_id, item.sha256)
                if known is not None:
                    item.source_id = known
                    item.frames = None
        compute: list[tuple[_Item, np.ndarray]] = []
        copies: list[tuple[_Item, str]] = []
        for item in batch:
            if item.source_id is not None:
                copies.append((item, item.source_id))
            else:
                assert item.frames is not None  # decoded clips carry frames; only copies have none
                compute.append((item, item.frames))

        vectors: dict[int, np.ndarray] = {}
        if compute:
            for (item, _), vec in zip(compute, self._forward([frames for _, frames in compute]), strict=True):
                vectors[id(item)] = vec
        if copies:
            arr, found = self.store.get_many(self.set_id, [source for _, source in copies])
            for (item, source), row, ok in zip(copies, arr, found, strict=True):
                if ok:
                    vectors[id(item)] = np.asarray(row, dtype=np.float32)
                    item.frames_used = self._stored_frames_used(source)  # same bytes, same frames
                else:  # the source vanished (set deleted meanwhile): nothing to copy
                    self._fail(
                        item,
                        ClipFailure(ClipFailureReason.DECODE_FAILED, "the cached feature for these bytes disappeared"),
                    )

        # One transaction decides every id of the batch: the first clip naming an id is stored,
        # a later one with the same bytes shares it, one with other bytes is a conflict.
        stored = [item for item in batch if id(item) in vectors]
        ids = [item.ids() for item in stored]
        outcome: list[str] = []
        if stored:
            outcome = self.store.put_if_absent(
                self.set_id,
                [clip_id for clip_id, _ in ids],
                np.stack([vectors[id(item)] for item in stored]),
                sha256s=[sha256 for _, sha256 in ids],
                infos=[None if item.frames_used is None else {"frames_used": item.frames_used} for item in stored],
            )
        for item, (clip_id, _), status in zip(stored, ids, outcome, strict=True):
            if status == "conflict":
                self._fail(item, clip_id_conflict(clip_id))
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

        teacher = self._loaded()
        views = [c.shape[0] for c in clips]
        rows = np.concatenate(clips, axis=0) if len(clips) > 1 else clips[0]
        outputs: list[torch.Tensor] = []
        # On a GPU a batch fills the device. On a CPU one clip is already 1568 tokens, plenty for
        # the GEMMs (batch 4 measured no faster per clip than batch 1), while a batch multiplies
        # the activations past glibc's mmap threshold (fresh pages, page faults, every block)
        # and makes each block too long for _share_cores to react to a decoder starting.
        step = self.config.batch_size if teacher.device.type == "cuda" else 1
        on_gpu = teacher.device.type == "cuda"
        with teacher.inference():
            for lo in range(0, rows.shape[0], step):
                frames = torch.from_numpy(rows[lo : lo + step])  # uint8: a quarter of float32's bytes
                if on_gpu:  # pinned, so the copy is a DMA that overlaps the previous chunk's forward
                    frames = frames.pin_memory().to(teacher.device, non_blocking=True)
                outputs.append(teacher.model.embed(normalize(frames, self.preprocess)).float())
        feats_t = torch.cat(outputs).cpu()  # one device-to-host copy (and sync) per batch
        if self._threads_now != self._cpu_threads:  # leave the process-wide setting as found
            torch.set_num_threads(self._cpu_threads)
            self._threads_now = self._cpu_threads
        feats = feats_t.numpy()
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
        blocks = getattr(self._loaded().model, "blocks", None)
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

    # ---- feature set --------------------------------------------------------------------------

    def _open_feature_set(self) -> None:
        from lastkd.featurestore import FeatureStoreError, feature_set_id

        teacher = self._loaded()
        name = self.config.model_name
        prep = preprocessing_record(self.preprocess, teacher.precision)
        try:
            self.set_id = feature_set_id(name, teacher.weights_sha256, prep)
            meta = self.store.create_set(
                teacher=name,
                weights_sha256=teacher.weights_sha256,
                preprocessing=prep,
                dim=teacher.dim,
                dtype=self.config.store_dtype,
            )
        except FeatureStoreError as exc:
            raise EngineError(f"cannot open the feature set for {name!r}: {exc}") from None
        if meta.set_id != self.set_id or meta.dim != teacher.dim:
            raise EngineError(
                f"feature set {meta.set_id!r} (dim {meta.dim}) does not match this teacher (dim {teacher.dim})"
            )
