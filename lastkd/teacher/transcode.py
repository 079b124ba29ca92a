"""One-off transcode of a dataset's videos to a small short side, because 1080p H.264 decoding is
the known bottleneck of training on NTU's RGB ("slow I/O").

Every frame is kept (same count, same rate), resized so the short side is ``short_side`` (aspect
kept, so boxes given as fractions of the frame, like the person crop, stay valid), and re-encoded
as MPEG-4 part 2 in AVI under the same file name (``..._rgb.avi`` names keep their NTU sample
name). Each output is written to a temporary name and renamed when complete, so an interrupted
run leaves only whole files, and running again skips what is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import cast

from lastkd.lifeline import die_with_parent
from lastkd.teacher.video import VideoError, VideoLimits, iter_frames

__all__ = ["TranscodeReport", "transcode_file", "transcode_tree", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")
# MPEG-4 part 2 decodes several times faster than H.264 at the same size; quality 3 keeps the
# small frames close to the source (the model sees 224 px crops of them).
CODEC, QSCALE = "mpeg4", "3"


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)  # yuv420p needs even sides


def transcode_file(src: Path, dst: Path, short_side: int, limits: VideoLimits | None = None) -> int:
    """Re-encode ``src`` to ``dst`` (short side ``short_side``); returns the frames written.
    Raises VideoError for a source that cannot be decoded; ``dst`` then does not exist."""
    import av

    info, frames = iter_frames(src, limits or VideoLimits(), threads=1)
    scale = short_side / min(info.width, info.height)
    width, height = _even(info.width * scale), _even(info.height * scale)
    if scale >= 1:  # never upscale: keep the source size
        width, height = _even(info.width), _even(info.height)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    rate = Fraction(info.fps).limit_denominator(1001) if info.fps else Fraction(30)
    written = 0
    try:
        with av.open(str(tmp), mode="w", format="avi") as out:
            stream = cast(av.VideoStream, out.add_stream(CODEC, rate=rate))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.options = {"qscale": QSCALE}
            try:
                for frame in frames:
                    small = frame.reformat(width=width, height=height, format="yuv420p", interpolation="BILINEAR")
                    small.pts = None
                    for packet in stream.encode(small):
                        out.mux(packet)
                    written += 1
            finally:
                frames.close()
            for packet in stream.encode():
                out.mux(packet)
        if written == 0:
            raise VideoError("no_frames", f"{src}: no frame could be decoded")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return written


@dataclass
class TranscodeReport:
    """What a run did: files written, skipped (already done), failed (path -> why)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def _job(src: Path, dst: Path, short_side: int) -> tuple[Path, str | None]:
    try:
        transcode_file(src, dst, short_side)
    except (VideoError, OSError) as exc:
        return src, str(exc)
    return src, None


def _sources(src_dir: Path) -> Iterable[Path]:
    return sorted(p for p in src_dir.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def transcode_tree(
    src_dir: Path,
    dst_dir: Path,
    short_side: int = 256,
    workers: int = 1,
    on_done: Callable[[Path, str | None], None] | None = None,
) -> TranscodeReport:
    """Transcode every video under ``src_dir`` to the same relative path under ``dst_dir``, in
    ``workers`` processes; outputs that exist are skipped (they are only ever renamed in whole)."""
    if not src_dir.is_dir():
        raise ValueError(f"{src_dir} is not a folder")
    if not 16 <= short_side <= 4096:
        raise ValueError(f"short side must be 16..4096, got {short_side}")
    if not 1 <= workers <= 256:
        raise ValueError(f"workers must be 1..256, got {workers}")
    if dst_dir.resolve() == src_dir.resolve() or dst_dir.resolve().is_relative_to(src_dir.resolve()):
        raise ValueError(f"the destination {dst_dir} must not be the source folder or inside it")
    report = TranscodeReport()
    todo = []
    for src in _sources(src_dir):
        dst = dst_dir / src.relative_to(src_dir).with_suffix(".avi")
        if dst.exists():
            report.skipped.append(dst)
        else:
            todo.append((src, dst))
    with ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent) as pool:
        futures = {pool.submit(_job, src, dst, short_side): dst for src, dst in todo}
        for future in as_completed(futures):
            src, error = future.result()
            if error is None:
                report.written.append(futures[future])
            else:
                report.failed[src] = error
            if on_done is not None:
                on_done(src, error)
    return report
