"""Video input for the teacher: safe opening, limits, PyAV decoding, frame sampling, preprocessing.

``prepare_clip`` turns a file into uint8 views ``(V, T, S, S, 3)`` (RGB, small, cheap to send
between processes); ``normalize`` turns a batch of those into the float model input
``(B, 3, T, S, S)``; ``load_clip`` does both for one file.

Opening is deliberately narrow. The first bytes of the file choose the demuxer from a short list
of real media containers (``_sniff``) and FFmpeg is never asked to guess: guessing would open a
text file as an "ANSI art" video, and playlist demuxers (HLS, concat) would read other files.
The file is opened through FFmpeg's ``file:`` protocol only, so a name such as ``concat:a|b``
is just a name.

Decoding is planned. When the number of frames is known (from the container, or from a cheap
packet scan when the container does not say), the frame indices are chosen first; each decoded
frame that is needed is converted and resized in one swscale call straight to the small target
size (a 1080p frame never exists as a full-size RGB array) and decoding stops after the last
needed frame. Frame ``i`` is the i-th frame the decoder outputs in presentation order, whatever
its timestamp, so for variable-frame-rate clips sampling is uniform in frame count (as with the
decord-based reference pipelines), not in time. If the stream yields fewer frames than planned
(declared counts can include dropped-frame slots, e.g. variable-rate AVI), the plan is redone
with the exact count and the file decoded once more.

Sampling (``PreprocessConfig.sampling``):

* ``uniform``: ``T`` indices spread over the whole clip, first and last frame included:
  ``idx_i = floor(i * (L - 1) / (T - 1) + 1/2)`` for ``i = 0..T-1`` (``T = 1``: the middle
  frame ``floor((L - 1) / 2)``). Clips shorter than ``T`` repeat frames.
* ``multiview``: the evaluation protocol of VideoMAE V2 (spec 7.1, test mode): every
  ``stride``-th frame, padded with the last one to ``T``; ``temporal_views`` windows of ``T``
  consecutive sampled frames starting at ``int(k * max((M - T) / (views - 1), 0))``; and
  ``spatial_crops`` squares along the long side at ``int(c * (long - S) / (crops - 1))``.
  Views are ordered temporal-major: view ``k * spatial_crops + c``. A single temporal view
  (or crop) is centred.

Protocols (``PreprocessConfig.protocol``):

* ``imagenet``: short side resized to ``S`` (long side ``floor(S * long / short)``), a square
  crop (centre crop at ``round((long - S) / 2)`` for ``uniform``), then ``/255`` and the
  ImageNet mean/std (spec 7.1).
* ``official_extraction``: the full frame squashed to ``S x S``, ``/255``, no mean/std
  (spec 7.2, the ``extract_tad_feature.py`` feature script).

Resizing uses swscale bilinear on the decoded YUV frame (colour conversion and resize in one
C call). When shrinking, swscale widens its filter with the scale factor (it antialiases), which
differs slightly from the reference's OpenCV/PyTorch bilinear without antialiasing.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np
import torch
from av.codec.hwaccel import HWAccel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lastkd.hashing import file_kind
from lastkd.teacher.failures import ClipFailureReason

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessConfig",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "crop_offsets",
    "load_clip",
    "multiview_indices",
    "normalize",
    "PreparedClip",
    "decode_clip",
    "DECODERS",
    "check_decoder",
    "decode_frames",
    "iter_frames",
    "prepare_clip",
    "probe",
    "resized_size",
    "uniform_indices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Frames wider or taller than this ratio are refused: after a short-side resize to 224 a
# 1x100000 "video" would become a multi-gigabyte frame.
MAX_ASPECT_RATIO = 8.0
# Upper bound on frames per second of content, so that the frame count is bounded by the duration
# limit even when timestamps lie.
MAX_FRAMES_PER_SECOND = 1000

PIPELINE_VERSION = "lastkd.video/1"

# A region of a frame as fractions of its width and height: (x0, y0, x1, y1).
Box = tuple[float, float, float, float]

# The subset of ClipFailureReason a file itself can cause (for type checkers; VideoError checks it).
Reason = Literal[
    "not_media", "corrupt", "no_video_stream", "no_frames", "too_short", "too_large", "too_long", "resolution"
]


class PreprocessConfig(BaseModel):
    """How a clip becomes model input; validated once, then passed around as a plain object."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampling: Literal["uniform", "multiview"] = "uniform"
    num_frames: int = Field(16, ge=1, le=256)
    stride: int = Field(4, ge=1, le=64, description="multiview: every stride-th frame")
    temporal_views: int = Field(5, ge=1, le=32, description="multiview only")
    spatial_crops: int = Field(3, ge=1, le=16, description="multiview only")
    protocol: Literal["imagenet", "official_extraction"] = "imagenet"
    size: int = Field(224, ge=8, le=1024)
    person_crop: bool = Field(
        False,
        description="Cut each clip to its person box (from the clip's .skeleton colorX/colorY: union over the "
        "clip, padded, square) at full resolution before resizing; spatial crops then collapse to one.",
    )
    crop_pad: float = Field(0.15, ge=0, le=2, description="person_crop: margin per side, x the box size.")

    @model_validator(mode="after")
    def _crops_need_aspect(self) -> PreprocessConfig:
        if self.sampling == "multiview" and self.protocol == "official_extraction" and self.spatial_crops != 1:
            raise ValueError(
                "protocol 'official_extraction' squashes the whole frame to a square, so there is "
                f"nothing to crop: multiview needs spatial_crops=1 with it (got {self.spatial_crops})"
            )
        return self

    @property
    def num_views(self) -> int:
        """Views per clip: 1 for uniform, temporal_views * spatial_crops for multiview (the
        temporal views alone with person_crop: the square box leaves nothing to crop)."""
        if self.sampling == "uniform":
            return 1
        return self.temporal_views * (1 if self.person_crop else self.spatial_crops)

    def as_dict(self) -> dict:
        """Canonical description (only the settings that change the output), for feature-set ids."""
        out: dict = {
            "pipeline": PIPELINE_VERSION,
            "sampling": self.sampling,
            "num_frames": self.num_frames,
            "protocol": self.protocol,
            "size": self.size,
            "resize": "swscale_bilinear",
        }
        if self.sampling == "multiview":
            out.update(stride=self.stride, temporal_views=self.temporal_views, spatial_crops=self.spatial_crops)
        if self.protocol == "imagenet":
            out.update(spatial="short_side_then_crop", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        else:
            out.update(spatial="squash", mean=None, std=None)
        if self.person_crop:  # only when on: the ids of sets made without it do not change
            out.update(
                spatial="person_box", person_box={"source": "skeleton_color_xy_union_square", "pad": self.crop_pad}
            )
            out.pop("spatial_crops", None)
        return out


@dataclass(frozen=True)
class VideoLimits:
    """Input limits checked before decoding (and guarded during it). Defaults match Settings."""

    max_bytes: int = 512 * 1024**2
    max_seconds: float = 600.0
    max_pixels: int = 4096 * 2160
    # Clips with fewer real frames are refused (``too_short``). 1 keeps the historical
    # behaviour: a short clip is embedded by repeating its frames (``frames_used`` says so).
    min_frames: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.min_frames, bool) or not isinstance(self.min_frames, int) or self.min_frames < 1:
            raise ValueError(f"VideoLimits.min_frames must be an int >= 1, got {self.min_frames!r}")
        for name in ("max_bytes", "max_seconds", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"VideoLimits.{name} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"VideoLimits.{name} must be finite, got {value!r}")

    @property
    def max_frames(self) -> int:
        """Frame-count ceiling implied by the duration limit."""
        return math.ceil(self.max_seconds * MAX_FRAMES_PER_SECOND)


class VideoError(ValueError):
    """A file that cannot become a clip; ``reason`` is machine-readable, the message says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = ClipFailureReason(reason)  # the one list of reasons; a code outside it is a bug
        self.message = message

    def __reduce__(self):  # survives pickling across worker processes with both fields
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream (counted from packets where it is silent)."""

    frames: int
    fps: float | None
    duration: float | None
    width: int
    height: int
    codec: str
    container: str


# --------------------------------------------------------------------------------------------
# frame plans (pure functions)


def uniform_indices(length: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread over ``[0, length)``, first and last frame included.

    ``idx_i = floor(i * (length - 1) / (num_frames - 1) + 1/2)``, computed exactly in integers.
    """
    if length < 1 or num_frames < 1:
        raise ValueError(f"need length >= 1 and num_frames >= 1, got {length}, {num_frames}")
    if num_frames == 1:
        return [(length - 1) // 2]
    den = num_frames - 1
    return [(2 * i * (length - 1) + den) // (2 * den) for i in range(num_frames)]


def multiview_indices(length: int, cfg: PreprocessConfig) -> list[list[int]]:
    """Frame indices of each temporal view (spec 7.1 test mode), ``temporal_views`` lists of T."""
    if length < 1:
        raise ValueError(f"need length >= 1, got {length}")
    t, views = cfg.num_frames, cfg.temporal_views
    sampled = list(range(0, length, cfg.stride))
    sampled += [sampled[-1]] * (t - len(sampled))
    m = len(sampled)
    if views == 1:
        starts = [(m - t) // 2]
    else:
        # float arithmetic and int() exactly as the reference VideoClsDataset does it
        step = max((m - t) / (views - 1), 0.0)
        starts = [int(k * step) for k in range(views)]
    return [sampled[s : s + t] for s in starts]


def resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) a frame is resized to before cropping."""
    s = cfg.size
    if cfg.protocol == "official_extraction":
        return s, s
    if width <= height:
        return s, (s * height) // width
    return (s * width) // height, s


def crop_offsets(long_side: int, size: int, crops: int, centre_round: bool = False) -> list[int]:
    """Offsets of ``crops`` squares of ``size`` along a side of ``long_side`` pixels.

    Several crops: ``int(c * (long - size) / (crops - 1))`` (spec 7.1). One crop: the centre,
    ``round((long - size) / 2)`` (Python rounding, spec 7.1 validation mode) when
    ``centre_round`` else ``(long - size) // 2``.
    """
    span = long_side - size
    if span < 0:
        raise ValueError(f"cannot crop {size} from {long_side}")
    if crops == 1:
        return [round(span / 2) if centre_round else span // 2]
    step = span / (crops - 1)
    return [int(c * step) for c in range(crops)]


# --------------------------------------------------------------------------------------------
# opening and probing

# (demuxer, label) for the containers we accept; FFmpeg never guesses the format.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")


def _sniff(head: bytes) -> str | None:
    """Demuxer name for a file starting with ``head``, or None when it is not a supported container."""
    if len(head) >= 12 and head[4:8] in _MP4_BOXES:
        return "mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"FLV":
        return "flv"
    if head[:16] == _ASF_GUID:
        return "asf"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    if head[:3] == b"ID3" or _mpeg_audio_frames(head):
        return "mp3"
    return None


_MPA_KBPS = {
    (1, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPA_KBPS[(2, 3)] = _MPA_KBPS[(2, 2)]


def _mpeg_audio_frame_length(head: bytes, pos: int) -> int:
    """Length of the MPEG audio frame whose header starts at ``pos``, or 0 if it is not one."""
    if pos + 4 > len(head) or head[pos] != 0xFF or head[pos + 1] & 0xE0 != 0xE0:
        return 0
    version_bits, layer_bits = (head[pos + 1] >> 3) & 3, (head[pos + 1] >> 1) & 3
    rate_index, sr_index, pad = head[pos + 2] >> 4, (head[pos + 2] >> 2) & 3, (head[pos + 2] >> 1) & 1
    if version_bits == 1 or layer_bits == 0 or rate_index in (0, 15) or sr_index == 3:
        return 0
    layer = 4 - layer_bits
    sample_rate = (44100, 48000, 32000)[sr_index] >> {3: 0, 2: 1, 0: 2}[version_bits]
    bitrate = _MPA_KBPS[(1 if version_bits == 3 else 2, layer)][rate_index] * 1000
    if layer == 1:
        return (12 * bitrate // sample_rate + pad) * 4
    per_frame = 72 if (layer == 3 and version_bits != 3) else 144
    return per_frame * bitrate // sample_rate + pad


def _mpeg_audio_frames(head: bytes) -> bool:
    """Raw MPEG audio: a valid frame header followed by a second one where the first frame ends."""
    first = _mpeg_audio_frame_length(head, 0)
    return first > 0 and _mpeg_audio_frame_length(head, first) > 0


@dataclass(frozen=True)
class _Source:
    path: Path
    demuxer: str
    stream_index: int
    info: VideoInfo


def _check_file(path: str | Path, limits: VideoLimits) -> tuple[Path, str]:
    p = Path(path)
    st = p.stat()  # FileNotFoundError / PermissionError name the path themselves
    if not stat.S_ISREG(st.st_mode):
        raise VideoError("not_media", f"not a regular file: a {file_kind(st.st_mode)}")
    if st.st_size == 0:
        raise VideoError("not_media", "not a media file: the file is empty (0 bytes)")
    if st.st_size > limits.max_bytes:
        raise VideoError("too_large", f"file is {st.st_size} bytes, over the limit of {limits.max_bytes} bytes")
    with p.open("rb") as fh:
        head = fh.read(4096)
    demuxer = _sniff(head)
    if demuxer is None:
        raise VideoError(
            "not_media",
            "not a media file: the content matches no supported container "
            "(mp4/mov, avi, mkv/webm, ogg, flv, asf, mpeg-ps/ts, wav, mp3)",
        )
    return p, demuxer


DECODERS = ("cpu", "nvdec")


def _open(path: Path, demuxer: str, decoder: str = "cpu") -> av.container.InputContainer:
    # nvdec: NVIDIA's hardware decoder through FFmpeg's CUDA hwaccel, without a silent fallback to
    # software (a host that asked for it and cannot have it is refused at start, check_decoder).
    hwaccel = HWAccel("cuda", allow_software_fallback=False) if decoder == "nvdec" else None
    try:
        return av.open(
            "file:" + str(path.resolve()),
            mode="r",
            format=demuxer,
            options={"protocol_whitelist": "file"},
            hwaccel=hwaccel,
        )
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"corrupt {demuxer} file: the container cannot be read ({_why(exc)})") from exc


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _check_resolution(width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError("corrupt", f"corrupt video stream: frame size {width}x{height}")
    if width * height > limits.max_pixels:
        raise VideoError(
            "resolution",
            f"resolution {width}x{height} ({width * height} pixels) is over the limit of {limits.max_pixels} pixels",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise VideoError("resolution", f"frame size {width}x{height} has an aspect ratio over {MAX_ASPECT_RATIO:g}:1")


def _too_long(seconds: float, limits: VideoLimits, where: str) -> VideoError:
    return VideoError("too_long", f"clip is {seconds:.2f} s long ({where}), over the limit of {limits.max_seconds:g} s")


def _inspect(path: str | Path, limits: VideoLimits) -> _Source:
    p, demuxer = _check_file(path, limits)
    container = _open(p, demuxer)
    try:
        videos = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not videos:
            found = ", ".join(sorted({s.type for s in container.streams})) or "none"
            raise VideoError("no_video_stream", f"no video stream in the {demuxer} file (streams found: {found})")
        stream = videos[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.name:
            raise VideoError("no_video_stream", f"the video stream's codec ({stream.codec_tag!r}) has no decoder here")
        width, height = ctx.width, ctx.height
        _check_resolution(width, height, limits)

        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        frames = stream.frames if stream.frames and stream.frames > 0 else None
        if duration is not None and duration > limits.max_seconds:
            raise _too_long(duration, limits, "declared by the container")
        if frames is not None and frames > limits.max_frames:
            raise _too_long(frames / (fps or MAX_FRAMES_PER_SECOND), limits, f"{frames} frames declared")
        if frames is not None and fps and frames / fps > limits.max_seconds:
            raise _too_long(frames / fps, limits, f"{frames} frames at {fps:g} fps")
        if frames is None:
            frames, scanned = _scan_packets(container, stream, limits)
            duration = duration if duration is not None else scanned
        if frames == 0:
            raise VideoError("no_frames", "the video stream holds no frames")
        info = VideoInfo(
            frames=frames, fps=fps, duration=duration, width=width, height=height, codec=ctx.name, container=demuxer
        )
        return _Source(path=p, demuxer=demuxer, stream_index=stream.index, info=info)
    finally:
        container.close()


def _scan_packets(container, stream, limits: VideoLimits) -> tuple[int, float | None]:
    """Count the video packets without decoding (containers like Matroska do not store a count).

    Also the first duration guard for files whose header gives no duration.
    """
    count, first, last_end = 0, None, None
    tb = stream.time_base
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if count > limits.max_frames:
                raise _too_long(count / MAX_FRAMES_PER_SECOND, limits, f"more than {limits.max_frames} frames")
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or tb is None:
                continue
            first = ts if first is None else min(first, ts)
            end = ts + (packet.duration or 0)
            last_end = end if last_end is None else max(last_end, end)
            if float((ts - first) * tb) > limits.max_seconds:
                raise _too_long(float((ts - first) * tb), limits, "found while reading the packets")
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"corrupt file: reading packet {count} failed ({_why(exc)})") from exc
    duration = float((last_end - first) * tb) if first is not None and last_end is not None else None
    return count, duration


def probe(path: str | Path, limits: VideoLimits) -> VideoInfo:
    """Describe the video stream and check every limit that can be checked without decoding.

    Raises ``VideoError`` (file size, container, stream, resolution, duration) and
    ``FileNotFoundError`` for a missing path.
    """
    return _inspect(path, limits).info


# --------------------------------------------------------------------------------------------
# decoding


def _small_frame(frame: av.VideoFrame, cfg: PreprocessConfig) -> np.ndarray:
    w, h = resized_size(frame.width, frame.height, cfg)
    return frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="BILINEAR")


def _boxed_frame(frame: av.VideoFrame, box: Box, side: int) -> np.ndarray:
    """The ``box`` (fractions of the frame) cut from the full-resolution frame, resized to ``side``^2."""
    from PIL import Image

    w, h = frame.width, frame.height
    x0, y0 = min(int(box[0] * w), w - 1), min(int(box[1] * h), h - 1)
    x1, y1 = max(math.ceil(box[2] * w), x0 + 1), max(math.ceil(box[3] * h), y0 + 1)
    img = frame.to_image().crop((x0, y0, min(x1, w), min(y1, h)))
    return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR))


def _checked_frames(
    src: _Source, limits: VideoLimits, threads: int, decoder: str = "cpu"
) -> Generator[av.VideoFrame, None, None]:
    """Every frame of ``src`` in order (demux ends with the empty packet that drains the decoder),
    each checked (intact, within the frame, time and resolution limits); FFmpeg errors become
    ``corrupt``."""
    n = 0
    container = _open(src.path, src.demuxer, decoder)
    try:
        # _inspect took this index from the container's video streams
        stream = cast(av.VideoStream, container.streams[src.stream_index])
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        tb = stream.time_base
        start = stream.start_time

        def decoded() -> Iterator[av.VideoFrame]:
            for packet in container.demux(stream):
                if packet.is_corrupt:
                    raise VideoError("corrupt", f"corrupt file: damaged or truncated data after frame {n}")
                yield from stream.codec_context.decode(packet)

        for frame in decoded():
            if frame.is_corrupt:
                raise VideoError("corrupt", f"corrupt video: frame {n} could not be decoded intact")
            if n >= limits.max_frames:
                raise _too_long(n / MAX_FRAMES_PER_SECOND, limits, f"more than {limits.max_frames} frames decoded")
            if frame.pts is not None and tb is not None:
                t = float((frame.pts - (start or 0)) * tb)
                if t > limits.max_seconds:
                    raise _too_long(t, limits, f"frame {n} is stamped at {t:.2f} s")
            _check_resolution(frame.width, frame.height, limits)  # streams may change size mid-way
            yield frame
            n += 1
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"corrupt video: decoding failed after frame {n} ({_why(exc)})") from exc
    finally:
        container.close()


def _decode_frames(
    src: _Source,
    needed: set[int],
    cfg: PreprocessConfig,
    limits: VideoLimits,
    threads: int,
    box: Box | None = None,
    decoder: str = "cpu",
) -> tuple[dict[int, np.ndarray], int]:
    """Decode until the last needed index; returns the needed small frames and the frames seen
    (with ``box``: that region of each frame, resized to ``cfg.size`` square)."""
    last = max(needed)
    kept: dict[int, np.ndarray] = {}
    n = 0
    frames = _checked_frames(src, limits, threads, decoder)
    try:
        for frame in frames:
            if n in needed:
                kept[n] = _small_frame(frame, cfg) if box is None else _boxed_frame(frame, box, cfg.size)
            n += 1
            if n > last:
                break
    finally:
        frames.close()  # closes the container now, not when the generator is collected
    return kept, n


def iter_frames(
    path: str | Path, limits: VideoLimits, threads: int = 0
) -> tuple[VideoInfo, Generator[av.VideoFrame, None, None]]:
    """What the container says, and every frame of it in order (checked as everywhere here): for
    re-encoding a whole clip (``lastkd transcode``)."""
    src = _inspect(path, limits)
    return src.info, _checked_frames(src, limits, threads)


def _plan(length: int, cfg: PreprocessConfig) -> list[list[int]]:
    """Frame indices per temporal view (one view for uniform sampling)."""
    if cfg.sampling == "uniform":
        return [uniform_indices(length, cfg.num_frames)]
    return multiview_indices(length, cfg)


def _crop(img: np.ndarray, offset: int, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    if w > h:
        return img[:, offset : offset + size]
    return img[offset : offset + size, :]


@dataclass(frozen=True)
class PreparedClip:
    """A decoded clip: its views, and how many distinct real frames of the file they show.

    ``frames_used`` is below ``num_frames`` when the clip is shorter than the sampling plan:
    the views then repeat frames (a one-frame video is that frame ``num_frames`` times).
    """

    views: np.ndarray
    frames_used: int


def _too_short(length: int, limits: VideoLimits, where: str) -> VideoError:
    return VideoError(
        "too_short", f"clip has {length} frame(s) ({where}), fewer than the minimum of {limits.min_frames}"
    )


def prepare_clip(path: str | Path, cfg: PreprocessConfig, limits: VideoLimits, threads: int = 0) -> np.ndarray:
    """Decode, sample and resize/crop one file: uint8 ``(V, T, S, S, 3)`` RGB, V = ``cfg.num_views``.

    ``threads``: decoder threads (0 lets FFmpeg choose, 1 decodes on the calling thread only).
    Raises ``VideoError`` for any input that cannot become a clip, with nothing half-done.
    """
    return decode_clip(path, cfg, limits, threads).views


def decode_clip(
    path: str | Path,
    cfg: PreprocessConfig,
    limits: VideoLimits,
    threads: int = 0,
    box: Box | None = None,
    decoder: str = "cpu",
) -> PreparedClip:
    """:func:`prepare_clip` that also counts the real frames used, and refuses clips shorter
    than ``limits.min_frames`` (``too_short``). With ``cfg.person_crop`` the clip's person
    ``box`` (fractions of the frame, :func:`lastkd.ntu.skeleton.person_box`) is required.
    ``decoder``: ``cpu`` (FFmpeg software) or ``nvdec`` (see :func:`check_decoder`)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0, got {threads!r}")
    if cfg.person_crop != (box is not None):
        raise ValueError("a person box is given exactly when the preprocessing has person_crop")
    views, kept = _decode_planned(path, lambda length: _plan(length, cfg), cfg, limits, threads, box, decoder)
    needed = {i for v in views for i in v}
    if box is not None:  # frames are the box, already square at cfg.size
        stacked = np.stack([np.stack([kept[i] for i in indices]) for indices in views])
        return PreparedClip(views=stacked, frames_used=len(needed))
    s = cfg.size
    crops = cfg.spatial_crops if cfg.sampling == "multiview" else 1
    out = np.empty((len(views) * crops, cfg.num_frames, s, s, 3), np.uint8)
    for k, indices in enumerate(views):
        for t, i in enumerate(indices):
            img = kept[i]
            long_side = max(img.shape[:2])
            if cfg.protocol == "official_extraction":
                offsets = [0] * crops
            else:
                offsets = crop_offsets(long_side, s, crops, centre_round=cfg.sampling == "uniform")
            for c, off in enumerate(offsets):
                out[k * crops + c, t] = _crop(img, off, s)
    return PreparedClip(views=out, frames_used=len(needed))


def _decode_planned(
    path: str | Path,
    plan: Callable[[int], list[list[int]]],
    cfg: PreprocessConfig,
    limits: VideoLimits,
    threads: int,
    box: Box | None = None,
    decoder: str = "cpu",
) -> tuple[list[list[int]], dict[int, np.ndarray]]:
    """Decode the frames ``plan(length)`` names; returns the plan and the resized frames by index."""
    src = _inspect(path, limits)
    if src.info.frames < limits.min_frames:  # declared (or counted) frames: refused before decoding
        raise _too_short(src.info.frames, limits, "in the container")
    views = plan(src.info.frames)
    needed = {i for v in views for i in v}
    kept, seen = _decode_frames(src, needed, cfg, limits, threads, box, decoder)
    if seen == 0:
        raise VideoError("no_frames", f"no frame could be decoded (the container declares {src.info.frames})")
    if len(kept) < len(needed):
        # The stream ended before the declared count (dropped-frame slots in variable-rate AVI,
        # frames the decoder discards): ``seen`` is now exact, so plan again and decode again.
        if seen < limits.min_frames:
            raise _too_short(seen, limits, f"decoded, of {src.info.frames} declared")
        views = plan(seen)
        needed = {i for v in views for i in v}
        kept, _ = _decode_frames(src, needed, cfg, limits, threads, box, decoder)
        if len(kept) < len(needed):
            raise VideoError("corrupt", f"decoding is not repeatable: frame {max(needed)} vanished on a second pass")
    return views, kept


def decode_frames(
    path: str | Path,
    pick: Callable[[int], list[int]],
    cfg: PreprocessConfig,
    limits: VideoLimits,
    threads: int = 1,
    box: Box | None = None,
) -> np.ndarray:
    """The frames ``pick(length)`` chooses (indices in ``[0, length)``, repeats allowed), resized
    as ``cfg`` says but not cropped: uint8 ``(T, H, W, 3)``. For training-time sampling, where the
    caller draws the window and the crop; refusals as :func:`decode_clip`.

    ``box`` ``(x0, y0, x1, y1)`` in fractions of the frame (a person's box): that region is cut
    from the full-resolution frame and resized to ``cfg.size`` square, so a small person keeps
    its pixels instead of being cut from an already shrunken frame."""
    (order,), kept = _decode_planned(path, lambda length: [pick(length)], cfg, limits, threads, box)
    return np.stack([kept[i] for i in order])


def check_decoder(decoder: str) -> str | None:
    """None when ``decoder`` can decode here, else why not (in words). ``nvdec`` is tried for
    real: a small H.264 clip is encoded in memory and decoded on the GPU without fallback."""
    if decoder not in DECODERS:
        return f"unknown decoder {decoder!r}; expected one of {', '.join(DECODERS)}"
    if decoder == "cpu":
        return None
    import io

    from av.codec.hwaccel import hwdevices_available

    if "cuda" not in hwdevices_available():
        return (
            f"this FFmpeg build has no CUDA hardware decoding (it offers: {', '.join(hwdevices_available()) or 'none'})"
        )
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = cast(
            av.VideoStream, out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=25)
        )
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(4):
            img = np.full((64, 64, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    try:
        with av.open(buf, mode="r", hwaccel=HWAccel("cuda", allow_software_fallback=False)) as container:
            decoded = sum(1 for _ in container.decode(video=0))
    except (av.error.FFmpegError, OSError, RuntimeError, ValueError) as exc:
        return f"NVDEC (CUDA hardware decoding) is not usable here ({_why(exc)}): is an NVIDIA GPU with its driver visible?"
    return None if decoded == 4 else f"NVDEC decoded {decoded} of 4 test frames"


# --------------------------------------------------------------------------------------------
# normalisation


def normalize(clips: torch.Tensor | np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 ``(B, T, S, S, 3)`` -> float32 ``(B, 3, T, S, S)``, on the device of ``clips``.

    Divides by 255, then applies the ImageNet mean/std when the protocol is ``imagenet``. The
    engine calls it on a GPU with the uint8 frames already there: 4x fewer bytes to copy, and
    the arithmetic off the single inference thread's CPU.
    """
    x = torch.as_tensor(clips)
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 frames, got {x.dtype}")
    expected = (cfg.num_frames, cfg.size, cfg.size, 3)
    if x.ndim != 5 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"normalize expects shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
    out = x.permute(0, 4, 1, 2, 3).to(torch.float32).div_(255.0).contiguous()
    if cfg.protocol == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=out.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=out.device).view(1, 3, 1, 1, 1)
        out.sub_(mean).div_(std)
    return out


def load_clip(path: str | Path, cfg: PreprocessConfig, limits: VideoLimits, threads: int = 0) -> torch.Tensor:
    """``normalize(prepare_clip(...))``: float32 ``(V, 3, T, S, S)`` for one file."""
    return normalize(torch.from_numpy(prepare_clip(path, cfg, limits, threads=threads)), cfg)
