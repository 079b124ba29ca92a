"""``lastkd embed PATH...``: embed every clip under some files or folders into the feature store.

Runs the same :class:`~lastkd.teacher.embedder.Embedder` as the HTTP service, so a clip
gets the same vector either way. Clip ids are NTU sample names when the file is named like one
(``S001C001P001R001A001_rgb.avi``), else the content sha256. Clips already in the feature set
are skipped before decoding, and results are written one batch per transaction, so a run that
was interrupted (Ctrl-C, a crash, a reboot) resumes where it stopped when started again.

Exit status: 0 all clips embedded or skipped; 1 some clips failed (see the report); 2 bad
arguments or a teacher that cannot start; 130 interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lastkd.services.settings import Settings
from lastkd.teacher.clip_ids import clip_id_from_filename, is_video_filename

__all__ = ["BulkSummary", "Failure", "NotAFile", "add_parser", "discover", "embed_files", "run"]


@dataclass
class Failure:
    """One clip that could not be embedded."""

    path: str
    clip_id: str | None
    code: str
    message: str


@dataclass
class BulkSummary:
    """What a bulk run did; written as the JSON report."""

    feature_set: str = ""
    found: int = 0
    embedded: int = 0  # newly stored (computed, or copied from identical bytes)
    computed: int = 0  # of which ran through the model
    skipped: int = 0  # already in the set
    failed: int = 0
    seconds: float = 0.0
    clips_per_s: float = 0.0
    interrupted: bool = False
    started_at: str = ""
    finished_at: str = ""
    failures: list[Failure] = field(default_factory=list)
    not_files: list[NotAFile] = field(default_factory=list)  # fifos, sockets, devices: never opened

    def fail(self, path: Path, clip_id: str | None, code: str, message: str) -> None:
        """Record one failure."""
        self.failed += 1
        self.failures.append(Failure(str(path), clip_id, code, message))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass
class NotAFile:
    """A path found under the inputs that is not a regular file (never opened)."""

    path: str
    kind: str


def discover(paths: list[Path]) -> tuple[list[Path], list[str], list[NotAFile]]:
    """Files to embed (sorted per folder, duplicates removed), the paths that do not exist, and
    the paths that exist but are not regular files (fifos, sockets, devices: never opened, since
    opening a fifo blocks forever and a device may never end).

    A file named on the command line is always tried; inside folders only files with a video
    extension are taken (hidden files and folders are ignored).
    """
    from lastkd.hashing import file_kind

    found: list[Path] = []
    missing: list[str] = []
    special: list[NotAFile] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        try:
            mode = p.stat().st_mode  # follows symlinks: a link to a regular file is a file
        except FileNotFoundError:
            missing.append(str(p))  # a dangling link
            return
        except OSError as exc:
            special.append(NotAFile(str(p), f"unreadable ({exc.strerror or exc})"))
            return
        if not stat.S_ISREG(mode):
            special.append(NotAFile(str(p), file_kind(mode)))
            return
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and is_video_filename(name):
                        add(Path(root) / name)
        elif path.exists() or path.is_symlink():
            add(path)
        else:
            missing.append(str(path))
    return found, missing, special


def embed_files(
    embedder: Any,
    files: list[Path],
    *,
    progress: bool | None = None,
    window: int | None = None,
    summary: BulkSummary | None = None,
) -> BulkSummary:
    """Embed ``files`` with a started Embedder, skipping clips already in its feature set.

    Keeps at most ``window`` clips in flight (default: enough to keep every decoder and one
    batch busy). ``progress=None`` shows a bar only on a terminal. On KeyboardInterrupt the
    summary so far is marked ``interrupted`` and the exception propagates.
    """
    from tqdm import tqdm

    summary = summary or BulkSummary()
    summary.feature_set = embedder.set_id
    summary.found = len(files)
    batch = embedder.config.batch_size
    window = window or max(2 * embedder.decode_workers + batch, 2 * batch)
    store, set_id = embedder.store, embedder.set_id
    ids_seen: set[str] = set()
    in_flight: dict[cf.Future, tuple[Path, str]] = {}
    start = time.perf_counter()
    bar = tqdm(
        total=len(files),
        unit="clip",
        disable=(not sys.stderr.isatty()) if progress is None else not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )

    def settle(done: set[cf.Future]) -> None:
        from lastkd.teacher.failures import ClipFailure

        for fut in done:
            path, clip_id = in_flight.pop(fut)
            try:
                result = fut.result()
            except ClipFailure as exc:
                summary.fail(path, clip_id, exc.reason, exc.message)
            except Exception as exc:  # noqa: BLE001 - a store or model error is reported per clip
                summary.fail(path, clip_id, type(exc).__name__, str(exc))
            else:
                summary.embedded += 1
                summary.computed += 0 if result.cached else 1
            bar.update(1)
        bar.set_postfix(embedded=summary.embedded, skipped=summary.skipped, failed=summary.failed, refresh=False)

    try:
        for path in files:
            clip_id = clip_id_from_filename(path.name)
            sha = None
            if clip_id is None:
                # Without an NTU name the id is the content hash: needed now to skip stored clips.
                from lastkd.hashing import sha256_file

                try:
                    sha = sha256_file(path)
                except OSError as exc:
                    summary.fail(path, None, "unreadable", f"cannot read {path}: {exc.strerror or exc}")
                    bar.update(1)
                    continue
                clip_id = sha
            if sha is not None and clip_id in ids_seen:
                summary.skipped += 1  # the same bytes twice in this run: nothing new to embed
                bar.update(1)
                continue
            ids_seen.add(clip_id)
            # Two files under one NTU name are both submitted: the store decides in its write
            # transaction which one holds the id, the other gets clip_id_conflict.
            present, held = store.clip_sha256(set_id, clip_id)
            if present:
                if sha is None and held is not None:
                    from lastkd.hashing import sha256_file

                    try:
                        sha = sha256_file(path)
                    except OSError as exc:
                        summary.fail(path, clip_id, "unreadable", f"cannot read {path}: {exc.strerror or exc}")
                        bar.update(1)
                        continue
                if held is None or held == sha:
                    summary.skipped += 1  # stored by an earlier run (resume)
                else:
                    from lastkd.teacher.failures import clip_id_conflict

                    conflict = clip_id_conflict(clip_id)
                    summary.fail(path, clip_id, conflict.reason, conflict.message)
                bar.update(1)
                continue
            while len(in_flight) >= window:
                done, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
                settle(done)
            in_flight[embedder.submit(path, clip_id, sha)] = (path, clip_id)
        while in_flight:
            done, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
            settle(done)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.clips_per_s = summary.embedded / summary.seconds if summary.seconds > 0 else 0.0
    return summary


def write_report(summary: BulkSummary, path: Path) -> None:
    """Write the JSON report atomically (a crash never leaves half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd embed``."""
    parser = subparsers.add_parser(
        "embed",
        help="embed video clips (files or folders) into the feature store",
        description="Embed every clip under PATH... with the teacher into the feature store; resumable.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="video files or folders")
    parser.add_argument(
        "--feature-set",
        default=None,
        metavar="ID",
        help="refuse to run unless the teacher settings produce this feature-set id",
    )
    parser.add_argument(
        "--workers", type=_positive, default=None, help="decoder processes (default: LASTKD_DECODE_WORKERS)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        help="clips per inference batch (default: LASTKD_TEACHER_BATCH_SIZE)",
    )
    parser.add_argument(
        "--sampling",
        choices=("uniform", "multiview"),
        default=None,
        help="frame sampling (default: LASTKD_TEACHER_SAMPLING, else uniform)",
    )
    parser.add_argument(
        "--protocol",
        choices=("imagenet", "official_extraction"),
        default=None,
        help="preprocessing (default: LASTKD_TEACHER_PROTOCOL, else imagenet)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="JSON report (default: <data_dir>/reports/embed-<time>.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..4096, got {value}")
    return value


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Discover, embed, report, summarise."""
    from lastkd.featurestore import FeatureStore, FeatureStoreError
    from lastkd.teacher.embedder import Embedder
    from lastkd.teacher.engine_config import (
        EngineConfig,
        EngineError,
        limits_from_settings,
        planned_set_id,
        preprocess_from_settings,
    )

    def err(message: str) -> int:
        print(f"lastkd embed: {message}", file=sys.stderr)
        return 2

    try:
        config = EngineConfig.from_settings(settings, decode_workers=args.workers, batch_size=args.batch_size)
    except EngineError as exc:
        return err(str(exc))
    files, missing, not_files = discover(list(args.paths))
    if missing:
        return err("no such file or folder: " + ", ".join(missing))
    for entry in not_files:
        print(f"lastkd embed: skipped {entry.path}: not a regular file ({entry.kind})", file=sys.stderr)
    if not files:
        return err("no video files found under " + ", ".join(map(str, args.paths)))
    report = args.report or settings.data_dir / "reports" / f"embed-{datetime.now():%Y%m%d-%H%M%S}.json"
    summary = BulkSummary(started_at=datetime.now(UTC).isoformat(timespec="seconds"), not_files=not_files)
    try:
        preprocess = preprocess_from_settings(settings, sampling=args.sampling, protocol=args.protocol)
        planned = planned_set_id(config, preprocess)
        if args.feature_set and args.feature_set != planned:
            return err(f"these teacher settings produce feature set {planned!r}, not {args.feature_set!r}")
        settings.resolved_store_path.parent.mkdir(parents=True, exist_ok=True)
        store = FeatureStore(settings.resolved_store_path, map_size=settings.store_map_size)
    except (EngineError, FeatureStoreError, ValueError, OSError) as exc:
        return err(str(exc))
    status = 0
    try:
        embedder = Embedder(config, preprocess, limits_from_settings(settings), store)
        embedder.start()
    except EngineError as exc:
        store.close()
        return err(str(exc))
    try:
        try:
            embed_files(embedder, files, progress=False if args.no_progress else None, summary=summary)
        except KeyboardInterrupt:
            status = 130
        status = status or (1 if summary.failed else 0)
    finally:
        embedder.close()
        store.close()
    summary.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
    write_report(summary, report)
    word = "interrupted" if summary.interrupted else "done"
    print(
        f"{word}: embedded {summary.embedded}, skipped {summary.skipped}, failed {summary.failed} "
        f"{f'(and {len(not_files)} not regular files skipped) ' if not_files else ''}"
        f"of {summary.found} clips in {summary.seconds:.1f}s ({summary.clips_per_s:.2f} clips/s); "
        f"feature set {summary.feature_set}; report {report}"
    )
    for failure in summary.failures[:10]:
        print(f"  failed {failure.path}: {failure.code}: {failure.message}", file=sys.stderr)
    if summary.failed > 10:
        print(f"  ... and {summary.failed - 10} more (see the report)", file=sys.stderr)
    return status
