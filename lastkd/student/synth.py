"""``lastkd synth``: a small SYNTHETIC dataset in the NTU RGB+D file formats.

Nothing here is real NTU data. The generator poses a 25-joint NTU skeleton in a plausible standing
posture and moves it with a class-dependent motion (which limb moves, how fast, how far), writes
the frames as ``.skeleton`` files in the real Kinect text format (all 12 values per joint, a body
info line with an integer 64-bit bodyID; two bodies for interaction-like classes) and, optionally,
renders each sample as a small ``_rgb.avi`` video (the skeleton drawn as lines and dots, MPEG-4
Part 2 in AVI, same frame count). Sample names are valid NTU names spread over setups, cameras,
performers and replications so that every standard split (xsub, xview; xsub120/xset120 with
``--dataset ntu120``) has training and validation samples of every class. Output is deterministic
for a seed. It exists to run the whole stack (teacher embedding, distillation, publishing) end to
end where the real dataset cannot be downloaded; accuracy on it says nothing about NTU.

Layout of OUT_DIR: ``skeletons/*.skeleton``, ``videos/*_rgb.avi``, ``label_map.txt`` (one class
description a line) and ``synthetic.json`` (the parameters, marked synthetic). The folder is built
beside OUT_DIR and renamed into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from lastkd.ntu.splits import XSUB60_TRAIN_PERFORMERS

if TYPE_CHECKING:
    from lastkd.services.settings import Settings

FPS = 30
VIDEO_SIZE = (160, 120)  # width, height
NUM_JOINTS = 25
EDGES_1BASED = (
    (1, 2),
    (2, 21),
    (3, 21),
    (4, 3),
    (5, 21),
    (6, 5),
    (7, 6),
    (8, 7),
    (9, 21),
    (10, 9),
    (11, 10),
    (12, 11),
    (13, 1),
    (14, 13),
    (15, 14),
    (16, 15),
    (17, 1),
    (18, 17),
    (19, 18),
    (20, 19),
    (22, 23),
    (23, 8),
    (24, 25),
    (25, 12),
)
# Standing pose, metres, relative to the spine base; +y up, the person faces the camera (-z), and
# their left side is at -x, as in real NTU data (see the shared sample).
_POSE = np.array(
    [
        (0.00, 0.00, 0.00),
        (0.00, 0.27, -0.01),
        (0.00, 0.52, -0.02),
        (0.00, 0.64, -0.02),  # 1-4
        (-0.17, 0.43, 0.00),
        (-0.22, 0.17, 0.02),
        (-0.24, -0.05, 0.00),
        (-0.245, -0.12, -0.01),  # 5-8
        (0.17, 0.43, 0.00),
        (0.22, 0.17, 0.02),
        (0.24, -0.05, 0.00),
        (0.245, -0.12, -0.01),  # 9-12
        (-0.08, -0.02, 0.00),
        (-0.09, -0.42, 0.01),
        (-0.09, -0.80, 0.03),
        (-0.09, -0.86, -0.07),  # 13-16
        (0.08, -0.02, 0.00),
        (0.09, -0.42, 0.01),
        (0.09, -0.80, 0.03),
        (0.09, -0.86, -0.07),  # 17-20
        (0.00, 0.45, -0.01),
        (-0.25, -0.19, -0.01),
        (-0.21, -0.12, -0.04),  # 21-23
        (0.25, -0.19, -0.01),
        (0.21, -0.12, -0.04),  # 24-25
    ],
    dtype=np.float64,
)
_LEAF_JOINTS = (4, 16, 20, 22, 23, 24, 25)  # Kinect reports zero orientation for these
_L_ARM, _R_ARM = (6, 7, 8, 22, 23), (10, 11, 12, 24, 25)
_L_FORE, _R_FORE = (7, 8, 22, 23), (11, 12, 24, 25)
_UPPER = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 21, 22, 23, 24, 25)
_Rotation = tuple[tuple[int, ...], int, str, int]  # (moving joints, pivot joint, axis, sign)
_Motion = tuple[_Rotation, ...] | Literal["y"]  # rotations, or a translation axis
# (description, motion)
_MOTIONS: tuple[tuple[str, _Motion], ...] = (
    ("raise left arm", ((_L_ARM, 5, "z", -1),)),
    ("raise right arm", ((_R_ARM, 9, "z", 1),)),
    ("raise both arms", ((_L_ARM, 5, "z", -1), (_R_ARM, 9, "z", 1))),
    ("swing left forearm", ((_L_FORE, 6, "x", 1),)),
    ("swing right forearm", ((_R_FORE, 10, "x", 1),)),
    ("kick left leg", (((14, 15, 16), 13, "x", 1),)),
    ("kick right leg", (((18, 19, 20), 17, "x", 1),)),
    ("bow", ((_UPPER, 1, "x", -1),)),
    ("nod head", (((4,), 3, "x", -1),)),
    ("bounce", "y"),
)
_TRAIN_PERFORMERS = sorted(XSUB60_TRAIN_PERFORMERS)
_VAL_PERFORMERS = sorted(set(range(1, 41)) - XSUB60_TRAIN_PERFORMERS)  # also val for xsub120
_CAMERA_YAW_DEG = {1: 0.0, 2: 45.0, 3: -45.0}
_LIMITS = {"ntu60": (17, 60), "ntu120": (32, 120)}  # max setup, max classes
BODY_ID_BASE = 72057594037927936  # 2**56: real Kinect ids are just above this


class SynthError(ValueError):
    """Parameters or an output folder the generator cannot use."""


@dataclass
class SynthResult:
    """What :func:`generate` wrote."""

    out_dir: Path
    skeleton_dir: Path
    video_dir: Path | None
    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# kinematics


def _rotation(axis: str, angle: np.ndarray) -> np.ndarray:
    """(F, 3, 3) rotation matrices about a coordinate axis."""
    c, s = np.cos(angle), np.sin(angle)
    z, o = np.zeros_like(angle), np.ones_like(angle)
    if axis == "x":
        rows = ((o, z, z), (z, c, -s), (z, s, c))
    elif axis == "y":
        rows = ((c, z, s), (z, o, z), (-s, z, c))
    else:
        rows = ((c, -s, z), (s, c, z), (z, z, o))
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def class_description(label: int) -> str:
    """Human-readable description of a synthetic class (its motion and tempo)."""
    name, _ = _MOTIONS[label % len(_MOTIONS)]
    level = label // len(_MOTIONS)
    return f"synthetic: {name}, tempo {level + 1}"


def _motion_params(label: int) -> tuple[_Motion, float, float]:
    """(motion, frequency Hz, amplitude) of a class: type from label % 10, tempo from label // 10."""
    _, motion = _MOTIONS[label % len(_MOTIONS)]
    level = label // len(_MOTIONS)
    freq = 0.45 + 0.22 * level
    amp = 1.1 - 0.05 * (level % 4)  # radians for rotations; scaled to metres for "bounce"
    return motion, freq, amp


def _animate(label: int, n_frames: int, rng: np.random.Generator, phase_shift: float = 0.0) -> np.ndarray:
    """Body-frame joint positions (F, 25, 3) of one performance of a class."""
    motion, freq, amp = _motion_params(label)
    freq *= rng.uniform(0.9, 1.1)
    amp *= rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 0.5) + phase_shift
    t = np.arange(n_frames) / FPS
    # 0 -> amp -> 0 each cycle: limbs move out from the rest pose and back
    swing = amp * 0.5 * (1 - np.cos(2 * math.pi * freq * t + phase))
    pose = np.repeat(_POSE[None], n_frames, axis=0) * rng.uniform(0.92, 1.08)
    if motion == "y":
        pose[..., 1] += 0.12 * swing[:, None]
    else:
        for joints, pivot, axis, sign in motion:
            idx = np.asarray(joints) - 1
            centre = pose[:, pivot - 1 : pivot, :]
            rot = _rotation(axis, sign * swing)
            pose[:, idx] = np.einsum("fij,fvj->fvi", rot, pose[:, idx] - centre) + centre
    return pose


def _place(pose: np.ndarray, yaw_deg: float, offset: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Body frame -> Kinect camera space (metres), with a little sensor noise."""
    rot = _rotation("y", np.full(len(pose), math.radians(yaw_deg)))
    world = np.einsum("fij,fvj->fvi", rot, pose) + offset
    return world + rng.normal(0, 0.004, size=world.shape)


def _kinect_fields(xyz: np.ndarray, quats: np.ndarray, states: np.ndarray) -> np.ndarray:
    """(F, 25, 12) joint lines: xyz, depth and colour pixel projections, orientation, state."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    depth_x, depth_y = 255.5 + 365.5 * x / z, 211.5 - 365.5 * y / z
    color_x, color_y = 959.5 + 1081.4 * x / z, 539.5 - 1081.4 * y / z
    q = np.broadcast_to(quats, xyz.shape[:2] + (4,))
    return np.concatenate([xyz, np.stack([depth_x, depth_y, color_x, color_y], -1), q, states[..., None]], axis=-1)


# ---------------------------------------------------------------------------------------------
# names


def _sample_names(classes: int, per_class: int, dataset: str) -> list[tuple[str, int]]:
    """(name, label) pairs; sample j of a class covers camera j%3, performer side j%2 and setup
    parity (j//2)%2, so any 4 consecutive samples reach both sides of every split."""
    max_setup = _LIMITS[dataset][0]
    odd = list(range(1, max_setup + 1, 2))
    even = list(range(2, max_setup + 1, 2))
    used: set[str] = set()
    out = []
    for label in range(classes):
        for j in range(per_class):
            camera = j % 3 + 1
            performers = _TRAIN_PERFORMERS if j % 2 == 0 else _VAL_PERFORMERS
            performer = performers[(j // 2 + 3 * label) % len(performers)]
            setups = even if (j // 2) % 2 else odd
            replication = (j // 3) % 2 + 1
            for bump in range(len(setups) * 2):
                setup = setups[(j // 4 + label + bump) % len(setups)]
                rep = replication if bump < len(setups) else 3 - replication
                name = f"S{setup:03d}C{camera:03d}P{performer:03d}R{rep:03d}A{label + 1:03d}"
                if name not in used:
                    break
            else:
                raise SynthError(
                    f"cannot make {per_class} distinct names for class {label}; use fewer samples per class"
                )
            used.add(name)
            out.append((name, label))
    return out


# ---------------------------------------------------------------------------------------------
# writers


_JOINT_FMT = " ".join(["%.7g"] * 11 + ["%d"])


def _skeleton_text(bodies: list[tuple[int, int, np.ndarray]], n_frames: int, rng: np.random.Generator) -> str:
    """The .skeleton text: bodies = [(body id, first frame, joint lines (F_b, 25, 12))]."""
    lean = rng.normal(0, 0.05, size=(len(bodies), 2))
    lines = [str(n_frames)]
    for f in range(n_frames):
        present = [(i, b) for i, b in enumerate(bodies) if b[1] <= f]
        lines.append(str(len(present)))
        for i, (body_id, start, joints) in present:
            lx, ly = lean[i]
            lines.append(f"{body_id} 0 1 1 1 1 0 {lx:.7g} {ly:.7g} 2")
            lines.append(str(NUM_JOINTS))
            lines.extend(_JOINT_FMT % tuple(row) for row in joints[f - start].tolist())
    return "\n".join(lines) + "\n"


def _draw_frames(color_xy: list[np.ndarray]) -> np.ndarray:
    """(F, H, W, 3) uint8 frames with each body's skeleton drawn from its colour-pixel positions."""
    width, height = VIDEO_SIZE
    n_frames = len(color_xy[0])
    background = np.empty((height, width, 3), dtype=np.uint8)
    background[:] = (40, 44, 52)
    background[int(height * 0.8) :] = (70, 66, 60)  # a floor, so the picture is not a flat colour
    frames = np.repeat(background[None], n_frames, axis=0)
    flat = frames.reshape(-1, 3)  # a view: pixel (f, y, x) is row (f * H + y) * W + x
    steps = np.linspace(0, 1, 24)[None, None, :, None]
    edges = np.asarray(EDGES_1BASED) - 1
    colours = (np.array((240, 200, 60), np.uint8), np.array((90, 200, 250), np.uint8))
    for b, xy in enumerate(color_xy):
        pix = xy * (width / 1920.0, height / 1080.0)  # (F_b, 25, 2) in video pixels
        a, c = pix[:, edges[:, 0], None], pix[:, edges[:, 1], None]  # (F_b, E, 1, 2)
        lines = (a + (c - a) * steps).reshape(len(pix), -1, 2)
        pts = np.rint(np.concatenate([lines, pix], axis=1)).astype(np.int64)  # (F_b, P, 2)
        pts = np.clip(pts, 0, (width - 2, height - 2))
        frame_idx = np.arange(n_frames - len(pix), n_frames)[:, None]
        flat_idx = np.unique(((frame_idx * height + pts[..., 1]) * width + pts[..., 0]).ravel())
        for offset in (0, 1, width, width + 1):  # 2x2 pixel pen
            flat[flat_idx + offset] = colours[b % 2]
    return frames


def _write_video(path: Path, frames: np.ndarray) -> None:
    import av  # deferred: only video generation needs FFmpeg

    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = {"qscale": "4"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------
# generation


def _validate(classes: int, per_class: int, frames: int, dataset: str, seed: int) -> None:
    if dataset not in _LIMITS:
        raise SynthError(f"dataset must be ntu60 or ntu120, got {dataset!r}")
    max_classes = _LIMITS[dataset][1]
    if not 2 <= classes <= max_classes:
        raise SynthError(f"--classes must be 2..{max_classes} for {dataset}, got {classes}")
    if not 4 <= per_class <= 200:
        raise SynthError(f"--samples-per-class must be 4..200 (4 reach both sides of every split), got {per_class}")
    if not 36 <= frames <= 300:
        raise SynthError(f"--frames must be 36..300, got {frames}")
    if not 0 <= seed < 2**32:
        raise SynthError(f"--seed must be 0..2**32-1, got {seed}")


def _sample(label: int, name: str, max_frames: int, rng: np.random.Generator) -> tuple[str, list[np.ndarray], int]:
    """One sample: (.skeleton text, per-body colour-pixel tracks, frame count)."""
    n_frames = int(rng.integers(math.ceil(max_frames / 3), max_frames + 1))
    camera = int(name[5:8])
    yaw = _CAMERA_YAW_DEG[camera] + rng.uniform(-10, 10)
    centre = np.array([rng.uniform(-0.4, 0.4), rng.uniform(0.0, 0.25), rng.uniform(2.6, 3.6)])
    performers = [(0, 0.0, 0.0)]  # (first frame, yaw offset, sideways offset)
    if label % 5 == 4:  # interaction-like: a partner facing the performer, sometimes joining late
        performers.append((int(rng.integers(0, n_frames // 4 + 1)), 180.0, 0.9))
    bodies, tracks = [], []
    for k, (first, yaw_off, side) in enumerate(performers):
        length = n_frames - first
        pose = _animate(label, length, rng, phase_shift=0.7 * k)
        side_dir = _rotation("y", np.array([math.radians(yaw)]))[0] @ np.array([side, 0.0, 0.0])
        xyz = _place(pose, yaw + yaw_off, centre + side_dir, rng)
        quats = rng.normal(size=(NUM_JOINTS, 4))
        quats /= np.linalg.norm(quats, axis=1, keepdims=True)
        quats[np.asarray(_LEAF_JOINTS) - 1] = 0.0
        states = np.where(rng.random((length, NUM_JOINTS)) < 0.03, 1, 2)
        fields = _kinect_fields(xyz, quats, states)
        body_id = BODY_ID_BASE + int(rng.integers(1_000, 10_000_000))
        bodies.append((body_id, first, fields))
        tracks.append(fields[..., 5:7])
    return _skeleton_text(bodies, n_frames, rng), tracks, n_frames


def generate(
    out_dir: str | os.PathLike[str],
    *,
    classes: int = 10,
    samples_per_class: int = 12,
    frames: int = 120,
    video: bool = True,
    seed: int = 0,
    dataset: str = "ntu60",
) -> SynthResult:
    """Write a synthetic NTU-format dataset to ``out_dir`` (which must not exist or be empty).

    ``frames`` is the longest clip; clip lengths vary between frames/3 and frames. Deterministic
    for ``seed``. Everything is written into a temporary sibling folder that is renamed into place
    at the end, so an error leaves no partial dataset.
    """
    _validate(classes, samples_per_class, frames, dataset, seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"{out} already exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    result = SynthResult(out_dir=out, skeleton_dir=out / "skeletons", video_dir=out / "videos" if video else None)
    try:
        (tmp / "skeletons").mkdir(parents=True)
        if video:
            (tmp / "videos").mkdir()
        for index, (name, label) in enumerate(_sample_names(classes, samples_per_class, dataset)):
            # one generator per sample: output does not depend on which other samples exist
            rng = np.random.default_rng([seed, label, index])
            text, tracks, n_frames = _sample(label, name, frames, rng)
            (tmp / "skeletons" / f"{name}.skeleton").write_text(text, encoding="ascii")
            if video:
                _write_video(tmp / "videos" / f"{name}_rgb.avi", _draw_frames(tracks))
            result.names.append(name)
            result.labels.append(label)
            result.frames.append(n_frames)
        (tmp / "label_map.txt").write_text("\n".join(class_description(c) for c in range(classes)) + "\n")
        manifest = {
            "synthetic": True,
            "note": "Synthetic data generated by `lastkd synth`; not NTU RGB+D recordings.",
            "dataset_layout": dataset,
            "classes": classes,
            "samples_per_class": samples_per_class,
            "max_frames": frames,
            "video": video,
            "seed": seed,
            "samples": len(result.names),
        }
        (tmp / "synthetic.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd synth``."""
    parser = sub.add_parser(
        "synth",
        help="generate a small SYNTHETIC NTU-format dataset (skeletons + rendered videos)",
        description=(
            "Generate a SYNTHETIC dataset in the NTU RGB+D file formats: .skeleton files with "
            "class-dependent limb motions and matching rendered _rgb.avi videos, named so that every "
            "standard split has training and validation samples of every class. Not real NTU data: "
            "for demos and end-to-end tests only."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new (or empty) output folder")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--samples-per-class", type=int, default=12, help="samples per class, >= 4 (default 12)")
    parser.add_argument(
        "--frames", type=int, default=120, help="longest clip in frames; clips vary from a third of it (default 120)"
    )
    parser.add_argument(
        "--video", action=argparse.BooleanOptionalAction, default=True, help="render _rgb.avi videos (default on)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    parser.add_argument(
        "--dataset", choices=("ntu60", "ntu120"), default="ntu60", help="name ranges to use (default ntu60)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``lastkd synth``; returns the process exit code."""
    del settings  # the output folder is given explicitly
    try:
        result = generate(
            args.out_dir,
            classes=args.classes,
            samples_per_class=args.samples_per_class,
            frames=args.frames,
            video=args.video,
            seed=args.seed,
            dataset=args.dataset,
        )
    except SynthError as exc:
        print(f"lastkd synth: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(result.names)} SYNTHETIC samples ({args.classes} classes) to {result.out_dir} "
        f"in {result.seconds:.1f}s: skeletons/" + (", videos/" if result.video_dir else "")
    )
    return 0
