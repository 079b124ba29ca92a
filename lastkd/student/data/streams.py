"""MIB input streams (joint, velocity, bone) from raw skeleton coordinates.

Two pipelines, selected by ``DataConfig.streams_mode``:

* ``reference`` reproduces the LAST v2 data pipeline of the reference commit bit for bit (spec
  ``last_v2.md`` 7.1-7.3 and 7.5), oddities included: first-frame centring that turns absent
  frames into constant poses, the yaw rotation that doubles the shoulder angle, a scale averaged
  over padding, repeat padding to 300 frames and a centre crop that sees only padding for short clips.
* ``standard`` computes the same three streams with those oddities fixed: one normalisation per
  sample, taken from the main body's present frames and shared by both bodies (so their relative
  position and facing survive), a rotation that really aligns the shoulders with X, temporal
  resampling of the valid frames (so short clips are not frozen poses) and velocity per raw frame.

All arrays are (C=3, T, V=25, M=2) float32. ``docs/data.md`` lists every difference and its reason.
Functions here are pure (no global RNG); randomness comes from a ``numpy.random.Generator`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_JOINTS = 25
NUM_BODIES = 2
REFERENCE_STORED_FRAMES = 300

# Spec 7.3: parents of the reference bone stream (0-based, joint 0 is its own parent -> zero bone).
REFERENCE_BONE_PARENTS: tuple[int, ...] = (
    0,
    0,
    20,
    2,
    20,
    4,
    5,
    6,
    20,
    8,
    9,
    10,
    0,
    12,
    13,
    14,
    0,
    16,
    17,
    18,
    1,
    7,
    6,
    11,
    10,
)

# Standard bone stream: the NTU skeleton graph (ntu_data.md / spec 1.1, the graph the model
# convolves over) oriented away from its centre joint 20 (spine shoulder), which is its own parent.
# These are the common CTR-GCN NTU bone pairs.
NTU_BONE_PARENTS: tuple[int, ...] = (
    1,
    20,
    20,
    2,
    20,
    4,
    5,
    6,
    20,
    8,
    9,
    10,
    0,
    12,
    13,
    14,
    0,
    16,
    17,
    18,
    20,
    22,
    7,
    24,
    11,
)

SPINE_BASE, NECK, LEFT_SHOULDER, RIGHT_SHOULDER = 0, 2, 4, 8

# Standard training crop: the resampled window covers this fraction range of the valid frames.
DEFAULT_TRAIN_WINDOW: tuple[float, float] = (0.5, 1.0)

# Standard velocity is computed per raw frame (1/30 s); its values are then ~1e-2 (variance ~1e-4
# on NTU-like motion), against ~0.3-0.6 for joints and 0.1-0.25 for bones. Expressed per second
# (x 30, NTU's frame rate) it lands in the range of the other streams: the Gaussian noise
# augmentation (std 0.01) no longer drowns it, and BatchNorm's eps (1e-5) is no longer a tenth
# of its variance.
STANDARD_VELOCITY_SCALE = 30.0


class StreamError(ValueError):
    """Raw coordinates that cannot be turned into streams (wrong shape, non-finite values)."""


def check_coords(x: np.ndarray, what: str = "coordinates") -> None:
    """Reject arrays that are not finite (3, T>=1, 25, 2) coordinates, naming the problem."""
    if not isinstance(x, np.ndarray):
        raise StreamError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[0] != 3 or x.shape[2] != NUM_JOINTS or x.shape[3] != NUM_BODIES:
        raise StreamError(f"{what} have shape {x.shape}, expected (3, T, {NUM_JOINTS}, {NUM_BODIES})")
    if x.shape[1] < 1:
        raise StreamError(f"{what} have no frames")
    if not np.isfinite(x).all():
        raise StreamError(f"{what} contain NaN or infinite values")


# ------------------------------------------------------------------------------------------------
# Shared stream helpers
# ------------------------------------------------------------------------------------------------


def bone_stream(joint: np.ndarray, parents: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """Bone[:, :, v] = J[:, :, v] - J[:, :, parent(v)] (a joint that is its own parent gets zero)."""
    # np.take is several times faster than fancy indexing here (same result)
    return joint - np.take(joint, np.asarray(parents, dtype=np.intp), axis=2)


def reference_velocity(joint: np.ndarray) -> np.ndarray:
    """Spec 7.3: Vel[:, t] = J[:, t+1] - J[:, t], last frame zero."""
    vel = np.zeros_like(joint)
    vel[:, :-1] = joint[:, 1:] - joint[:, :-1]
    return vel


def presence(x: np.ndarray) -> np.ndarray:
    """(T, M) bool: body m is present in frame t when any of its coordinates is non-zero."""
    nz = x[0] != 0
    nz |= x[1] != 0
    nz |= x[2] != 0
    # reduce over joints along a contiguous axis: reducing (T, 25, 2) over axis 1 runs numpy
    # inner loops of 2 elements and is several times slower
    t, v, m = nz.shape
    return nz.transpose(0, 2, 1).reshape(t * m, v).any(axis=1).reshape(t, m)


# ------------------------------------------------------------------------------------------------
# Reference pipeline (spec 7.1-7.3, 7.5)
# ------------------------------------------------------------------------------------------------


def reference_length(coords: np.ndarray, target: int = REFERENCE_STORED_FRAMES) -> np.ndarray:
    """Spec 7.1 length to ``target``: repeat the last raw frame, or keep floor(linspace) frames."""
    check_coords(coords, "raw coordinates")
    f = coords.shape[1]
    if f == target:
        return np.ascontiguousarray(coords, dtype=np.float32)
    if f > target:
        idx = np.floor(np.linspace(0, f - 1, target)).astype(np.intp)
        return np.ascontiguousarray(coords[:, idx], dtype=np.float32)
    pad = np.repeat(coords[:, f - 1 : f], target - f, axis=1)
    return np.concatenate([coords, pad], axis=1).astype(np.float32, copy=False)


def reference_centre(x: np.ndarray) -> np.ndarray:
    """Spec 7.2 step 1: subtract each body's frame-0 spine base from all its frames."""
    return (x - x[:, 0:1, SPINE_BASE : SPINE_BASE + 1, :]).astype(np.float32, copy=False)


def reference_rotate(x: np.ndarray) -> np.ndarray:
    """Spec 7.2 step 2, with its sign oddity: the frame-0 shoulder yaw is doubled, not cancelled."""
    out = x.copy()
    for m in range(x.shape[3]):
        dx = x[0, 0, RIGHT_SHOULDER, m] - x[0, 0, LEFT_SHOULDER, m]
        dz = x[2, 0, RIGHT_SHOULDER, m] - x[2, 0, LEFT_SHOULDER, m]
        a = -np.arctan2(dz, dx)  # float32 scalar arithmetic, as in the reference
        c, s = np.cos(a), np.sin(a)
        xs, zs = x[0, :, :, m], x[2, :, :, m]
        out[0, :, :, m] = xs * c + zs * s
        out[2, :, :, m] = zs * c - xs * s
    return out


def reference_scale(x: np.ndarray) -> np.ndarray:
    """Spec 7.2 step 3: divide each body by its mean neck-spine length over all stored frames."""
    out = x.copy()
    for m in range(x.shape[3]):
        length = np.linalg.norm(x[:, :, NECK, m] - x[:, :, SPINE_BASE, m], axis=0).mean()
        out[..., m] = x[..., m] / max(length, np.float32(1e-6))
    return out


def reference_streams(coords: np.ndarray, stored_frames: int = REFERENCE_STORED_FRAMES) -> dict[str, np.ndarray]:
    """The three stored reference streams (3, 300, 25, 2) from unpadded raw coordinates (3, F, 25, 2)."""
    joint = reference_scale(reference_rotate(reference_centre(reference_length(coords, stored_frames))))
    return {
        "joint": joint,
        "velocity": reference_velocity(joint),
        "bone": bone_stream(joint, REFERENCE_BONE_PARENTS),
    }


def reference_crop_start(stored_frames: int, num_frames: int, rng: np.random.Generator | None) -> int:
    """Spec 7.5 window start: uniform in [0, T_stored - T] for training, (T_stored - T) // 2 otherwise."""
    if stored_frames <= num_frames:
        return 0
    if rng is None:
        return (stored_frames - num_frames) // 2
    return int(rng.integers(0, stored_frames - num_frames + 1))


def reference_crop(stream: np.ndarray, start: int, num_frames: int) -> np.ndarray:
    """``num_frames`` consecutive frames from ``start``; repeat the last frame when the stream is shorter."""
    window = stream[:, start : start + num_frames]
    if window.shape[1] < num_frames:
        pad = np.repeat(window[:, -1:], num_frames - window.shape[1], axis=1)
        window = np.concatenate([window, pad], axis=1)
    return np.ascontiguousarray(window, dtype=np.float32)


def reference_frame_index(raw_frames: int, stored_frames: int = REFERENCE_STORED_FRAMES) -> np.ndarray:
    """Raw frame shown at each stored frame by spec 7.1 (repeat-last padding or floor(linspace))."""
    if raw_frames < 1:
        raise StreamError("raw coordinates have no frames")
    if raw_frames > stored_frames:
        return np.floor(np.linspace(0, raw_frames - 1, stored_frames)).astype(np.intp)
    return np.minimum(np.arange(stored_frames), raw_frames - 1)


def reference_window(
    coords: np.ndarray, start: int, num_frames: int, stored_frames: int = REFERENCE_STORED_FRAMES
) -> dict[str, np.ndarray]:
    """``reference_crop(reference_streams(coords)[k], start, num_frames)`` for every stream, cheaply.

    Normalises only the frames of the window (plus one for the velocity) and joints 0 and 2 of all
    stored frames (for the scale). The float32 operations per element are those of the full
    pipeline, so the result is identical to it, not merely close.
    """
    check_coords(coords, "raw coordinates")
    idx = reference_frame_index(coords.shape[1], stored_frames)
    m_count = coords.shape[3]
    origin = coords[:, 0, SPINE_BASE, :]  # (3, M): frame 0 of the stored array is raw frame 0
    f0 = coords[:, 0] - origin[:, None, :]
    cos = np.empty(m_count, np.float32)
    sin = np.empty(m_count, np.float32)
    for m in range(m_count):
        a = -np.arctan2(
            f0[2, RIGHT_SHOULDER, m] - f0[2, LEFT_SHOULDER, m], f0[0, RIGHT_SHOULDER, m] - f0[0, LEFT_SHOULDER, m]
        )
        cos[m], sin[m] = np.cos(a), np.sin(a)

    # Per-body loops on x[..., m] views: broadcasting (M,) parameters over a trailing axis of
    # length 2 makes numpy run inner loops of 2 elements, several times slower.
    def normalise(frames: np.ndarray, joints: slice | list[int], scale: np.ndarray | None = None) -> np.ndarray:
        x = coords[:, frames][:, :, joints]
        out = np.empty_like(x)
        for m in range(m_count):
            xm = x[..., m] - origin[:, m, None, None]
            out[0, ..., m] = xm[0] * cos[m] + xm[2] * sin[m]
            out[1, ..., m] = xm[1]
            out[2, ..., m] = xm[2] * cos[m] - xm[0] * sin[m]
            if scale is not None:
                out[..., m] /= scale[m]
        return out

    spine = normalise(idx, [SPINE_BASE, NECK])
    scale = np.empty(m_count, np.float32)
    for m in range(m_count):
        length = np.linalg.norm(spine[:, :, 1, m] - spine[:, :, 0, m], axis=0).mean()
        scale[m] = max(length, np.float32(1e-6))

    stop = min(start + num_frames, stored_frames)
    ext = min(stop + 1, stored_frames)  # one more frame for the last velocity, if it exists
    joint_ext = normalise(idx[start:ext], slice(None), scale)
    joint = joint_ext[:, : stop - start]
    velocity = np.zeros_like(joint)
    velocity[:, : ext - start - 1] = joint_ext[:, 1:] - joint_ext[:, :-1]
    full = {"joint": joint, "velocity": velocity, "bone": bone_stream(joint, REFERENCE_BONE_PARENTS)}
    return {k: reference_crop(v, 0, num_frames) for k, v in full.items()}


# ------------------------------------------------------------------------------------------------
# Standard pipeline
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormParams:
    """One normalisation shared by all bodies of a sample, estimated from its main body.

    The main body (``body``) is slot 0, or the first slot with any present frame when slot 0 is
    never present (-1: no body at all). ``origin`` (3,) is its spine base at its first present
    frame; ``cos``/``sin`` the shoulder yaw at that frame; ``scale`` its mean neck-spine length over
    its present frames. Applying the same transform to every body keeps where the other person
    stands and faces relative to the main one (NTU interaction classes). ``present`` (L, M);
    ``first``/``last`` the span of frames in which any body is present (``first`` = -1: none).
    """

    origin: np.ndarray
    cos: float
    sin: float
    scale: float
    body: int
    present: np.ndarray
    first: int
    last: int


def standard_norm_params(coords: np.ndarray) -> NormParams:
    """Normalisation parameters of unpadded raw coordinates (3, L, 25, 2) (bodies tracked by id)."""
    pres = presence(coords)
    any_frames = np.flatnonzero(pres.any(axis=1))
    if not any_frames.size:
        return NormParams(np.zeros(3, np.float32), 1.0, 0.0, 1.0, -1, pres, -1, -1)
    first, last = int(any_frames[0]), int(any_frames[-1])
    body = int(np.flatnonzero(pres.any(axis=0))[0])
    valid = pres[:, body]
    frame = coords[:, int(valid.argmax()), :, body]  # (3, 25) first present frame of the main body
    origin = frame[:, SPINE_BASE].astype(np.float32)
    dx = float(frame[0, RIGHT_SHOULDER] - frame[0, LEFT_SHOULDER])
    dz = float(frame[2, RIGHT_SHOULDER] - frame[2, LEFT_SHOULDER])
    norm_xz = float(np.hypot(dx, dz))
    # degenerate shoulders: leave the yaw alone
    cos, sin = (dx / norm_xz, dz / norm_xz) if norm_xz > 1e-9 else (1.0, 0.0)
    spine = coords[:, :, NECK, body][:, valid] - coords[:, :, SPINE_BASE, body][:, valid]  # (3, n)
    scale = max(float(np.sqrt(np.square(spine).sum(axis=0)).mean()), 1e-6)
    return NormParams(origin, cos, sin, scale, body, pres, first, last)


def standard_positions(
    first: int,
    last: int,
    num_frames: int,
    rng: np.random.Generator | None,
    window: tuple[float, float] | None = DEFAULT_TRAIN_WINDOW,
) -> tuple[np.ndarray, float]:
    """Fractional raw-frame positions to sample, and their spacing in raw frames.

    Validation (``rng`` None): uniform over [first, last]. Training: a window covering a random
    fraction U(window) of the valid span at a random offset, sampled uniformly. ``window`` None
    (time crop off): the validation positions, with the same draws made from ``rng`` (so the
    draws after it do not change).
    """
    span = float(last - first)
    if rng is None:
        start, length = float(first), span
    else:
        lo, hi = window if window is not None else DEFAULT_TRAIN_WINDOW
        length = span * float(rng.uniform(lo, hi))
        start = first + float(rng.uniform(0.0, span - length)) if span > length else float(first)
        if window is None:
            start, length = float(first), span
    positions = np.linspace(start, start + length, num_frames)
    # linspace may overshoot by an ulp; positions index raw frames
    return np.clip(positions, first, last), length / (num_frames - 1)


def resample(coords: np.ndarray, present: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of (3, L, 25, M) at fractional frame ``positions`` -> ((3, T, 25, M), (T, M)).

    Interpolation is per body only between two frames where the body is present; otherwise the
    nearest frame is taken (so a body absent there stays exactly zero).
    """
    n = coords.shape[1]
    i0 = np.floor(positions).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (positions - i0).astype(np.float32)
    lin = coords[:, i0] * (1 - w)[None, :, None, None] + coords[:, i1] * w[None, :, None, None]
    both = present[i0] & present[i1]
    nearest = np.where(w < 0.5, i0, i1)
    if both.all():
        return lin, both
    out = np.where(both[None, :, None, :], lin, coords[:, nearest])
    return out.astype(np.float32, copy=False), both | present[nearest]


def _frame_mask(present: np.ndarray, num_joints: int = NUM_JOINTS) -> np.ndarray:
    """(T, M) presence as a float32 (T, V, M) mask: broadcasting (T, 1, M) would run 2-element inner loops."""
    return np.repeat(present[:, None, :], num_joints, axis=1).astype(np.float32)


def apply_norm(x: np.ndarray, present: np.ndarray, params: NormParams) -> np.ndarray:
    """Centre, rotate (main body's shoulder line onto +X) and scale all bodies with the one shared
    transform of ``params``; absent frames are zero."""
    out = np.zeros_like(x)
    if not present.any():
        return out
    # rotation by -yaw about Y, (dx, dz) = r(cos, sin) -> (r, 0), with the scale folded in; the
    # transform is the same for every body, so it is applied to the whole array at once
    k = 1.0 / params.scale
    c, s = np.float32(params.cos * k), np.float32(params.sin * k)
    xc = x - params.origin[:, None, None, None]
    out[0] = xc[0] * c + xc[2] * s
    out[1] = xc[1] * np.float32(k)
    out[2] = xc[2] * c - xc[0] * s
    if not present.all():
        out *= _frame_mask(present)
    return out


def standard_velocity(joint: np.ndarray, present: np.ndarray, step: float) -> np.ndarray:
    """Velocity per raw frame of a resampled joint stream whose frames are ``step`` raw frames apart.

    Zero where the body is absent at either end; the last frame repeats the previous velocity.
    """
    vel = np.zeros_like(joint)
    if joint.shape[1] < 2:
        return vel
    inv = np.float32(1.0 / step) if step > 1e-6 else np.float32(0.0)
    vel[:, :-1] = joint[:, 1:] - joint[:, :-1]
    vel[:, :-1] *= inv
    both = present[:-1] & present[1:]
    if not both.all():
        vel[:, :-1] *= _frame_mask(both)
    vel[:, -1] = vel[:, -2]
    if not present[-1].all():
        vel[:, -1] *= present[-1].astype(np.float32)
    return vel


def standard_joint(
    coords: np.ndarray,
    num_frames: int,
    rng: np.random.Generator | None,
    params: NormParams | None = None,
    window: tuple[float, float] | None = DEFAULT_TRAIN_WINDOW,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Normalised joint stream resampled to ``num_frames`` from unpadded raw coordinates (3, L, 25, 2).

    Returns (joint (3, T, 25, 2), present (T, 2), step in raw frames). ``rng`` None = validation.
    """
    if params is None:
        params = standard_norm_params(coords)
    if params.first < 0:  # no body anywhere: nothing to normalise
        return (
            np.zeros((3, num_frames, NUM_JOINTS, coords.shape[3]), np.float32),
            np.zeros((num_frames, coords.shape[3]), bool),
            1.0,
        )
    positions, step = standard_positions(params.first, params.last, num_frames, rng, window)
    x, pres = resample(coords, params.present, positions)
    return apply_norm(x, pres, params), pres, step


def standard_streams(joint: np.ndarray, present: np.ndarray, step: float) -> dict[str, np.ndarray]:
    """Joint, velocity (per second: per raw frame x ``STANDARD_VELOCITY_SCALE``) and bone (NTU
    graph parents) of a resampled joint stream."""
    return {
        "joint": joint,
        "velocity": standard_velocity(joint, present, step / STANDARD_VELOCITY_SCALE),
        "bone": bone_stream(joint, NTU_BONE_PARENTS),
    }
