"""Training-time skeleton augmentations, one set of random parameters per sample.

Parameters are drawn from a ``numpy.random.Generator`` handed in by the caller (the Dataset seeds
one per (seed, epoch, index), so results do not depend on DataLoader workers). Every parameter is
always drawn, whether its augmentation is switched on or not, so switching one augmentation off
leaves the others' values unchanged. Application order follows spec 7.5 (rotate, scale, shear,
flip, noise); the optional joint/part drop comes last so dropped joints are exactly zero.

Rotation, scaling and shear are linear, so applying them to joint, velocity and bone alike equals
recomputing velocity and bone from the transformed joints; they are applied as one 3x3 matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lastkd.student.data.config import AugmentConfig

NUM_JOINTS = 25

# Body parts for part drop (0-based NTU joints); every joint belongs to exactly one part.
BODY_PARTS: dict[str, tuple[int, ...]] = {
    "trunk": (0, 1, 2, 3, 20),
    "left_arm": (4, 5, 6, 7, 21, 22),
    "right_arm": (8, 9, 10, 11, 23, 24),
    "left_leg": (12, 13, 14, 15),
    "right_leg": (16, 17, 18, 19),
}
_PART_NAMES = tuple(BODY_PARTS)


@dataclass(frozen=True)
class AugmentParams:
    """The random parameters of one sample (drawn whether or not each augmentation is enabled)."""

    angle_deg: float
    scale: float
    shear: float
    flip: bool
    dropped_joints: np.ndarray  # bool (25,)
    drop_part: bool
    part: str


def draw_params(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentParams:
    """Draw one sample's parameters in spec 7.5 order (after the temporal crop), then the drops."""
    angle = float(rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg))
    scale = float(rng.uniform(cfg.scale_range[0], cfg.scale_range[1]))
    shear = float(rng.uniform(-cfg.shear_max, cfg.shear_max))
    flip = bool(rng.random() < cfg.flip_prob)
    dropped = rng.random(NUM_JOINTS) < cfg.joint_drop_prob
    drop_part = bool(rng.random() < cfg.part_drop_prob)
    part = _PART_NAMES[int(rng.integers(len(_PART_NAMES)))]
    return AugmentParams(angle, scale, shear, flip, dropped, drop_part, part)


def spatial_matrix(params: AugmentParams, cfg: AugmentConfig) -> np.ndarray | None:
    """Shear @ scale @ rotation as one (3, 3) matrix acting on (x, y, z); None when all are off."""
    mat = np.eye(3)
    used = False
    if cfg.rotate:
        a = np.deg2rad(params.angle_deg)
        c, s = np.cos(a), np.sin(a)
        # spec 7.5: x' = cos*x + sin*z, z' = -sin*x + cos*z
        mat = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ mat
        used = True
    if cfg.scale:
        mat = params.scale * mat
        used = True
    if cfg.shear:
        mat = np.array([[1.0, params.shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ mat
        used = True
    return mat.astype(np.float32) if used else None


def apply_spatial(x: np.ndarray, mat: np.ndarray | None) -> np.ndarray:
    """Apply a (3, 3) coordinate transform to a (3, T, V, M) stream."""
    if mat is None:
        return x
    return np.tensordot(mat, x, axes=(1, 0)).astype(np.float32, copy=False)


def apply_flip(x: np.ndarray, params: AugmentParams, cfg: AugmentConfig) -> np.ndarray:
    """Reverse the frame order when the flip is drawn (spec 7.5: velocity is reversed as-is)."""
    if cfg.flip and params.flip:
        return np.ascontiguousarray(x[:, ::-1])
    return x


def transform(streams: Mapping[str, np.ndarray], params: AugmentParams, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Rotate, scale, shear and flip every stream identically."""
    mat = spatial_matrix(params, cfg)
    return {k: apply_flip(apply_spatial(v, mat), params, cfg) for k, v in streams.items()}


def add_noise(
    streams: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    present: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Independent Gaussian noise per stream (drawn in the streams' order, spec 7.5 step 6).

    With ``present`` (T, M), frames where a body is absent get no noise and stay exactly zero.
    """
    if not cfg.noise or cfg.noise_std == 0:
        return dict(streams)
    mask = None
    if present is not None and not present.all():
        # (T, V, M) mask: broadcasting (T, 1, M) would run numpy inner loops of 2 elements
        mask = np.repeat(present[:, None, :], NUM_JOINTS, axis=1).astype(np.float32)
    # torch's vectorised normal sampler is ~3x faster than numpy's here; its generator is seeded
    # from ``rng`` so the noise is still a function of the caller's seed only.
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    out = {}
    for k, v in streams.items():
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32).numpy()
        noise *= np.float32(cfg.noise_std)
        if mask is not None:
            noise *= mask
        out[k] = v + noise
    return out


def drop_joints(streams: Mapping[str, np.ndarray], params: AugmentParams, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Zero the drawn joints and/or body part in every stream, all frames and bodies."""
    keep = np.ones(NUM_JOINTS, dtype=bool)
    if cfg.joint_drop:
        keep &= ~params.dropped_joints
    if cfg.part_drop and params.drop_part:
        keep[list(BODY_PARTS[params.part])] = False
    if keep.all():
        return dict(streams)
    mask = keep.astype(np.float32)[None, None, :, None]
    return {k: v * mask for k, v in streams.items()}


def augment(
    streams: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    params: AugmentParams | None = None,
) -> dict[str, np.ndarray]:
    """Full spec 7.5 augmentation of ready-made streams: transform, flip, noise, then drops."""
    if params is None:
        params = draw_params(rng, cfg)
    out = transform(streams, params, cfg)
    out = add_noise(out, rng, cfg)
    return drop_joints(out, params, cfg)
