"""NTU RGB+D sample names and the raw ``.skeleton`` text format.

Two things live here, both defined by the dataset itself (see ``specs/ntu_data.md``):

* sample names ``SsssCcccPpppRrrrAaaa`` -> :class:`SampleName` (label = action - 1);
* the Kinect ``.skeleton`` text file -> :class:`ParsedSkeleton`, coordinates (3, F, 25, 2).

Body assignment has two modes. ``reference`` reproduces the LAST v2 preprocessing
(``specs/last_v2.md`` 7.1): bodies go to slots in the order they appear within each frame, no
tracking; slots 0 and 1 are kept. ``tracked`` (the usual CTR-GCN practice) follows each bodyID
across frames, drops noise bodies and gives each chosen body one fixed slot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

NUM_JOINTS = 25
NUM_SLOTS = 2  # M: bodies kept per sample
JOINT_VALUES = 12  # x y z depthX depthY colorX colorY orientW X Y Z trackingState
BODY_INFO_VALUES = 10
REFERENCE_PARSED_BODIES = 4  # the reference parses up to 4 bodies per frame, keeps 2

# Limits that reject hostile or corrupt files before they allocate anything large. Real NTU files
# have at most a few hundred frames, a handful of bodies and are well under 10 MB.
MAX_FRAMES = 20_000
MAX_BODIES_PER_FRAME = 32
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_ABS_COORD = 1e4  # metres; anything beyond is corruption, not a person
NOISE_MAX_FRAMES = 10  # a body tracked in this many frames or fewer is noise

BodyAssignment = Literal["tracked", "reference"]
BodyId = int | str

_NON_TEXT = re.compile(rb"[^\t\n\r\x20-\x7e]")  # anything but printable ASCII and line breaks
_NAME_RE = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")
_LIMITS = {
    # field: (ntu60 max, ntu120 max)
    "setup": (17, 32),
    "camera": (3, 3),
    "performer": (40, 106),
    "replication": (2, 2),
    "action": (60, 120),
}


class SampleNameError(ValueError):
    """A string that is not a valid NTU sample name (for the dataset asked about)."""


@dataclass(frozen=True, order=True)
class SampleName:
    """The five fields of an NTU sample name; all 1-based as written in the name."""

    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @property
    def label(self) -> int:
        """The 0-based class index (action - 1)."""
        return self.action - 1

    def __str__(self) -> str:
        return f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}R{self.replication:03d}A{self.action:03d}"


def parse_sample_name(name: str, dataset: Literal["ntu60", "ntu120"] = "ntu120") -> SampleName:
    """Parse ``SsssCcccPpppRrrrAaaa`` exactly (no suffix, no path) and check each field's range.

    ``dataset`` selects the ranges: ntu60 (setups 1-17, performers 1-40, actions 1-60) or ntu120
    (setups 1-32, performers 1-106, actions 1-120). Raises :class:`SampleNameError`.
    """
    if not isinstance(name, str):
        raise SampleNameError(f"sample name must be a string, got {type(name).__name__}")
    match = _NAME_RE.fullmatch(name)
    if match is None:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise SampleNameError(f"{shown!r} is not an NTU sample name (expected SsssCcccPpppRrrrAaaa)")
    values = dict(zip(_LIMITS, (int(g) for g in match.groups())))
    col = 0 if dataset == "ntu60" else 1
    for field_name, limits in _LIMITS.items():
        if not 1 <= values[field_name] <= limits[col]:
            raise SampleNameError(f"{name}: {field_name} {values[field_name]} outside 1..{limits[col]} for {dataset}")
    return SampleName(**values)


def sample_name_from_path(path: str | os.PathLike[str]) -> str:
    """The sample name a skeleton or video file carries (``X.skeleton``, ``X_rgb.avi`` -> ``X``)."""
    stem = Path(path).name
    for suffix in (".skeleton", "_rgb.avi"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return Path(stem).stem


class SkeletonParseError(ValueError):
    """A malformed ``.skeleton`` file: which file, which line (1-based; 0 = whole file), why."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")


@dataclass
class ParsedSkeleton:
    """One parsed ``.skeleton`` file.

    ``coords`` is float32 (3, frames, 25, 2): x, y, z per joint per body slot, zero where a slot is
    empty. ``body_ids`` are the ids of the bodies in slot order (exact ints, or strings when an id
    is not an integer); ``n_bodies_seen`` counts the distinct body ids in the whole file.
    """

    name: str
    frames: int
    coords: np.ndarray
    body_ids: list[BodyId]
    n_bodies_seen: int


def _body_id(token: str) -> BodyId:
    # Kinect body ids are 64-bit integers: float() would silently lose the low digits.
    try:
        return int(token)
    except ValueError:
        return token


class _Lines:
    """Line cursor over the file text, with error helpers that know the current line number."""

    def __init__(self, path: str, lines: list[str]) -> None:
        self.path = path
        self.lines = lines
        self.pos = 0  # index of the next line to read

    def error(self, reason: str, line: int | None = None) -> SkeletonParseError:
        return SkeletonParseError(self.path, self.pos if line is None else line, reason)

    def next_tokens(self, what: str) -> list[str]:
        if self.pos >= len(self.lines):
            raise SkeletonParseError(self.path, len(self.lines), f"truncated file: ends where {what} was expected")
        tokens = self.lines[self.pos].split()
        self.pos += 1
        return tokens

    def next_int(self, what: str, low: int, high: int) -> int:
        tokens = self.next_tokens(what)
        if len(tokens) != 1:
            raise self.error(f"expected one integer ({what}), got {len(tokens)} values")
        try:
            value = int(tokens[0])
        except ValueError:
            raise self.error(f"{what} {tokens[0][:40]!r} is not an integer") from None
        if not low <= value <= high:
            raise self.error(f"{what} {value} outside {low}..{high}")
        return value


def _read_text(path: str) -> list[str]:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise SkeletonParseError(path, 0, f"file is {size} bytes, more than the {MAX_FILE_BYTES} allowed")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SkeletonParseError(path, 0, f"cannot read file: {exc.strerror or exc}") from None
    if not raw.strip():
        raise SkeletonParseError(path, 1, "empty file")
    bad = _NON_TEXT.search(raw)
    if bad is not None:
        line = raw.count(b"\n", 0, bad.start()) + 1
        raise SkeletonParseError(
            path,
            line,
            f"binary data (byte 0x{raw[bad.start()]:02x} at offset {bad.start()}): not a .skeleton text file",
        )
    text = raw.decode("ascii")
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    return lines


def _joint_block(cur: _Lines) -> np.ndarray:
    """Read 25 joint lines -> float64 (25, 12), with the offending line named on any error."""
    start = cur.pos
    end = start + NUM_JOINTS
    if end > len(cur.lines):
        raise SkeletonParseError(
            cur.path,
            len(cur.lines),
            f"truncated file: body at line {start} has {len(cur.lines) - start} of {NUM_JOINTS} joint lines",
        )
    rows = [cur.lines[i].split() for i in range(start, end)]
    cur.pos = end
    for offset, row in enumerate(rows):
        if len(row) != JOINT_VALUES:
            raise cur.error(f"joint line has {len(row)} values, expected {JOINT_VALUES}", start + offset + 1)
    try:
        block = np.array(rows, dtype=np.float64)
    except ValueError:
        for offset, row in enumerate(rows):  # slow path only to name the bad line
            for token in row:
                try:
                    float(token)
                except ValueError:
                    raise cur.error(f"non-numeric value {token[:40]!r} in joint line", start + offset + 1) from None
        raise cur.error("non-numeric value in joint block", start + 1) from None
    xyz = block[:, :3]
    if not np.isfinite(xyz).all() or np.abs(xyz).max() > MAX_ABS_COORD:
        ok = np.isfinite(xyz) & (np.abs(xyz) <= MAX_ABS_COORD)
        offset = int(np.flatnonzero(~ok.all(axis=1))[0])
        raise cur.error(f"joint coordinate {rows[offset][:3]} is not finite or implausibly large", start + offset + 1)
    return block


def _read_frames(path: str, lines: list[str], columns: slice = slice(0, 3)) -> list[list[tuple[BodyId, np.ndarray]]]:
    """Walk the file structure; return per frame the (bodyID, joint values (25, k)) of each body,
    ``columns`` of the 12 per joint (x, y, z by default)."""
    cur = _Lines(path, lines)
    n_frames = cur.next_int("frame count", 0, MAX_FRAMES)
    frames: list[list[tuple[BodyId, np.ndarray]]] = []
    for f in range(n_frames):
        if cur.pos >= len(lines):
            raise SkeletonParseError(
                path, len(lines), f"truncated file: {n_frames} frames declared, file ends after {f}"
            )
        n_bodies = cur.next_int(f"body count of frame {f + 1}", 0, MAX_BODIES_PER_FRAME)
        bodies: list[tuple[BodyId, np.ndarray]] = []
        for _ in range(n_bodies):
            info = cur.next_tokens("a body info line")
            if len(info) != BODY_INFO_VALUES:
                raise cur.error(f"body info line has {len(info)} values, expected {BODY_INFO_VALUES}")
            for token in info[1:]:
                try:
                    float(token)
                except ValueError:
                    raise cur.error(f"non-numeric value {token[:40]!r} in body info line") from None
            n_joints = cur.next_int("joint count", 0, 10_000)
            if n_joints != NUM_JOINTS:
                raise cur.error(f"wrong joint count {n_joints}, expected {NUM_JOINTS}")
            bodies.append((_body_id(info[0]), _joint_block(cur)[:, columns]))
        frames.append(bodies)
    if cur.pos < len(lines):
        raise SkeletonParseError(
            path, cur.pos + 1, f"frame count mismatch: {n_frames} frames declared but the file continues"
        )
    return frames


def _assign_reference(frames: list[list[tuple[BodyId, np.ndarray]]]) -> tuple[np.ndarray, list[BodyId]]:
    n = len(frames)
    arr = np.zeros((n, NUM_JOINTS, 3, NUM_SLOTS), dtype=np.float32)  # the reference's (F, 25, 3, 2)
    ids: list[BodyId] = []
    for f, bodies in enumerate(frames):
        for slot, (body_id, xyz) in enumerate(bodies[:REFERENCE_PARSED_BODIES]):
            if slot < NUM_SLOTS:
                arr[f, :, :, slot] = xyz
                if body_id not in ids:
                    ids.append(body_id)
    return arr.transpose(2, 0, 1, 3), ids


def _motion(xyz: np.ndarray) -> float:
    """Spread of a body over time: summed per-coordinate variance of all joints (CTR-GCN practice)."""
    return float(xyz.var(axis=0).sum()) if len(xyz) > 1 else 0.0


def _assign_tracked(frames: list[list[tuple[BodyId, np.ndarray]]]) -> tuple[np.ndarray, list[BodyId]]:
    tracks: dict[BodyId, dict[int, np.ndarray]] = {}
    for f, bodies in enumerate(frames):
        for body_id, xyz in bodies:
            tracks.setdefault(body_id, {}).setdefault(f, xyz)  # a duplicated id in one frame: first wins
    order = list(tracks)  # dict order = order of first appearance
    kept = [b for b in order if len(tracks[b]) > NOISE_MAX_FRAMES]
    if not kept and order:
        # A short clip where every body is "noise": keep the longest-tracked one rather than nothing.
        kept = [max(order, key=lambda b: len(tracks[b]))]
    if len(kept) > NUM_SLOTS:
        motion = {b: _motion(np.stack(list(tracks[b].values()))) for b in kept}
        best = set(sorted(kept, key=lambda b: -motion[b])[:NUM_SLOTS])
        kept = [b for b in kept if b in best]
    arr = np.zeros((3, len(frames), NUM_JOINTS, NUM_SLOTS), dtype=np.float32)
    for slot, body_id in enumerate(kept):
        for f, xyz in tracks[body_id].items():
            arr[:, f, :, slot] = xyz.T
    return arr, kept


def parse_skeleton_file(path: str | os.PathLike[str], body_assignment: BodyAssignment = "tracked") -> ParsedSkeleton:
    """Parse one NTU ``.skeleton`` file into (3, F, 25, 2) float32 coordinates.

    ``body_assignment``: ``"tracked"`` (default) follows body ids, drops bodies seen in at most
    10 frames and, when more than two remain, keeps the two with the largest motion, each in a fixed
    slot by first appearance. ``"reference"`` puts bodies into slots in per-frame order, exactly as
    the LAST v2 preprocessing does. Frames without bodies stay zero in both modes; a file with zero
    frames parses to an empty (3, 0, 25, 2) array (callers decide whether that is usable).
    Raises :class:`SkeletonParseError` naming the file, the line and the reason.
    """
    if body_assignment not in ("tracked", "reference"):
        raise ValueError(f"body_assignment must be 'tracked' or 'reference', got {body_assignment!r}")
    path_s = os.fspath(path)
    frames = _read_frames(path_s, _read_text(path_s))
    assign = _assign_reference if body_assignment == "reference" else _assign_tracked
    coords, ids = assign(frames)
    seen = {body_id for bodies in frames for body_id, _ in bodies}
    return ParsedSkeleton(
        name=sample_name_from_path(path_s),
        frames=len(frames),
        coords=np.ascontiguousarray(coords),
        body_ids=ids,
        n_bodies_seen=len(seen),
    )


# The Kinect colour frame the skeletons' colorX/colorY are measured in (NTU's RGB videos are this size).
COLOR_FRAME = (1920.0, 1080.0)


def color_boxes(path: str | os.PathLike[str]) -> np.ndarray:
    """Per frame the box ``(x0, y0, x1, y1)`` around every body's joints in the RGB video, from the
    ``colorX``/``colorY`` columns (pixels of the 1920x1080 Kinect colour frame); NaN rows for frames
    without a body. Raises :class:`SkeletonParseError` like :func:`parse_skeleton_file`."""
    path_s = os.fspath(path)
    frames = _read_frames(path_s, _read_text(path_s), columns=slice(5, 7))
    out = np.full((len(frames), 4), np.nan)
    for f, bodies in enumerate(frames):
        xy = [b for _, b in bodies if np.isfinite(b).all()]
        if xy:
            pts = np.concatenate(xy)
            out[f] = (*pts.min(axis=0), *pts.max(axis=0))
    return out


def person_box(boxes: np.ndarray, pad: float) -> tuple[float, float, float, float] | None:
    """One box for a whole clip from per-frame joint boxes (:func:`color_boxes`, colour-frame
    pixels): their union (steady: the crop does not jitter with the pose), ``pad`` x its size added
    on each side, grown to a square, kept inside the frame; as fractions of the frame. None when
    no frame has a body."""
    valid = boxes[np.isfinite(boxes).all(axis=1)]
    if not len(valid):
        return None
    x0, y0 = valid[:, 0].min(), valid[:, 1].min()
    x1, y1 = valid[:, 2].max(), valid[:, 3].max()
    side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * pad)
    side = min(side, *COLOR_FRAME)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0.0), COLOR_FRAME[0] - side)
    top = min(max(cy - side / 2, 0.0), COLOR_FRAME[1] - side)
    w, h = COLOR_FRAME
    return (left / w, top / h, (left + side) / w, (top + side) / h)


def read_missing_list(path: str | os.PathLike[str]) -> frozenset[str]:
    """Read an official missing-skeleton list (one sample name a line; blanks and # comments ignored)."""
    names: set[str] = set()
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read missing-skeleton list: {exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            parse_sample_name(entry)
        except SampleNameError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        names.add(entry)
    return frozenset(names)
