"""Test media: small real clips encoded with PyAV/FFmpeg, and truly bad files.

Reusable by every test that needs a video on disk. Clips are tiny (tens of frames, at most a few
hundred pixels a side) so they encode in milliseconds. Patterns make frames identifiable after
decoding, resizing and cropping:

* ``"index"``: a flat grey frame whose level encodes the frame number (``index_level``); read it
  back with ``read_index`` from any crop or resize of the frame.
* ``"columns"``: red rises left to right, green top to bottom, blue is constant, so the position
  of a crop can be read from its colours (``columns_frame``).
* ``"moving"``: a bright square moving over a dark gradient, so consecutive frames differ.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np

Pattern = Literal["index", "columns", "moving"]

# Aliases so callers can name the format rather than the FFmpeg encoder.
_ENCODERS = {"h264": "libx264", "vp9": "libvpx-vp9", "vp8": "libvpx", "mpeg4": "mpeg4"}
_MUXERS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm", "avi": "avi", "mov": "mov"}
# Irregular frame gaps (milliseconds) for variable-frame-rate clips.
VFR_GAPS_MS = (20, 70, 33, 120, 45, 10)

INDEX_BASE = 10
INDEX_STEP = 6
MAX_INDEX_FRAMES = (255 - INDEX_BASE) // INDEX_STEP + 1  # 41


def index_level(index: int) -> int:
    """Grey level of frame ``index`` in the ``"index"`` pattern."""
    if not 0 <= index < MAX_INDEX_FRAMES:
        raise ValueError(f"the index pattern encodes frames 0..{MAX_INDEX_FRAMES - 1}, got {index}")
    return INDEX_BASE + INDEX_STEP * index


def read_index(rgb: np.ndarray) -> int:
    """Frame number encoded by the ``"index"`` pattern in an RGB image (any size or crop)."""
    level = float(np.asarray(rgb, dtype=np.float64).mean())
    return int(round((level - INDEX_BASE) / INDEX_STEP))


def columns_frame(width: int, height: int) -> np.ndarray:
    """The ``"columns"`` pattern: R = 255*x/(W-1), G = 255*y/(H-1), B = 64."""
    xs = np.linspace(0.0, 255.0, width)
    ys = np.linspace(0.0, 255.0, height)
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = np.round(xs)[None, :]
    img[..., 1] = np.round(ys)[:, None]
    img[..., 2] = 64
    return img


def pattern_frame(pattern: Pattern, index: int, width: int, height: int) -> np.ndarray:
    """The RGB uint8 (H, W, 3) source image of frame ``index``."""
    if pattern == "index":
        return np.full((height, width, 3), index_level(index), np.uint8)
    if pattern == "columns":
        return columns_frame(width, height)
    if pattern == "moving":
        img = np.empty((height, width, 3), np.uint8)
        img[...] = np.linspace(20, 90, width, dtype=np.uint8)[None, :, None]
        side = max(4, min(width, height) // 4)
        x0 = (index * 7) % max(1, width - side)
        y0 = (index * 5) % max(1, height - side)
        img[y0 : y0 + side, x0 : x0 + side] = (240, 200, 40)
        return img
    raise ValueError(f"unknown pattern {pattern!r}")


class _NonSeekable(io.RawIOBase):
    """Write-only stream that refuses to seek, so muxers cannot go back to write a duration/index."""

    def __init__(self, sink: io.BufferedWriter) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:  # type: ignore[override]
        return self._sink.write(data)


def make_clip(
    path: str | Path,
    container: str = "mp4",
    codec: str = "h264",
    frames: int = 20,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    vfr: bool = False,
    pattern: Pattern = "moving",
    seekable: bool = True,
) -> Path:
    """Encode a synthetic clip with PyAV and return its path.

    ``size`` is (width, height); both must be even for 4:2:0 encoders. ``vfr`` gives frames
    irregular timestamps (``VFR_GAPS_MS``, time base 1/1000). ``seekable=False`` writes through a
    stream that cannot seek, so containers like Matroska carry no duration or cues.
    """
    path = Path(path)
    width, height = size
    encoder = _ENCODERS.get(codec, codec)
    muxer = _MUXERS.get(container, container)
    sink = open(path, "wb")
    out = av.open(sink if seekable else _NonSeekable(sink), "w", format=muxer)
    try:
        stream = out.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if encoder == "libx264":
            stream.options = {"crf": "12", "preset": "fast"}  # keeps B-frames: frame reordering is exercised
        else:
            stream.bit_rate = 4_000_000
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(pattern, i, width, height), format="rgb24")
            if vfr:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += VFR_GAPS_MS[i % len(VFR_GAPS_MS)]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    finally:
        out.close()
        sink.close()
    return path


def make_video_without_frames(path: str | Path) -> Path:
    """Matroska file with a declared 64x48 H.264 video stream but no video packets (audio only)."""
    path = Path(path)
    out = av.open(str(path), "w", format="matroska")
    try:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        audio.layout = "mono"
        _encode_silence(out, audio, chunks=5)
    finally:
        out.close()
    return path


def _encode_silence(out, audio, chunks: int) -> None:
    samples = audio.codec_context.frame_size or 1024
    for i in range(chunks):
        frame = av.AudioFrame(format=audio.format.name, layout="mono", samples=samples)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate, frame.pts = audio.rate, i * samples
        for packet in audio.encode(frame):
            out.mux(packet)
    for packet in audio.encode():
        out.mux(packet)


def make_audio(path: str | Path, container: Literal["wav", "mp3", "ogg"] = "wav") -> Path:
    """A fraction of a second of silence with no video stream: wav/pcm, mp3/lame or ogg/flac."""
    path = Path(path)
    codec, rate = {"wav": ("pcm_s16le", 16000), "mp3": ("libmp3lame", 16000), "ogg": ("flac", 16000)}[container]
    out = av.open(str(path), "w", format=container)
    try:
        audio = out.add_stream(codec, rate=rate)
        audio.layout = "mono"
        _encode_silence(out, audio, chunks=8)
    finally:
        out.close()
    return path


def make_random_bytes(path: str | Path, size: int = 20_000, seed: int = 0) -> Path:
    """Random bytes (not a container any demuxer recognises; the seed is checked by the tests)."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def make_text_file(path: str | Path) -> Path:
    """A plain text file (FFmpeg would open some text as an 'ANSI art' video if allowed to guess)."""
    path = Path(path)
    path.write_text("clip_id,label\nS001C001P001R001A001,0\nthis is not a video\n" * 20, encoding="utf-8")
    return path


def make_empty_file(path: str | Path) -> Path:
    """A zero-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def truncated_copy(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src`` into ``dst`` (a download cut off in the middle)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def corrupted_copy(src: str | Path, dst: str | Path, at: float = 0.5, length: int = 4096, seed: int = 0) -> Path:
    """Copy ``src`` with ``length`` random bytes overwritten at relative position ``at``."""
    data = bytearray(Path(src).read_bytes())
    start = int(len(data) * at)
    noise = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    data[start : start + length] = noise[: max(0, min(length, len(data) - start))]
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def without_id3(src: str | Path, dst: str | Path) -> Path:
    """Copy an mp3 without its leading ID3v2 tag, leaving bare MPEG audio frames."""
    data = Path(src).read_bytes()
    if data[:3] == b"ID3":
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]  # syncsafe integer
        data = data[10 + size :]
    dst = Path(dst)
    dst.write_bytes(data)
    return dst
