"""MIB streams: the reference pipeline against the golden ``mib_sample``, the standard pipeline's properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lastkd.ntu.skeleton import parse_skeleton_file
from lastkd.student.data import streams as st
from tests.support.paths import NTU_SAMPLE_SKELETON, REFERENCE

ATOL = 1e-5  # reference/README.md: data pipeline tolerance
STREAM_KEYS = ("joint", "velocity", "bone")
# Graph edges of ntu_data.md (1-based), for an independent check of the standard bone parents.
NTU_EDGES_1BASED = (
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


@pytest.fixture(scope="module")
def golden() -> dict:
    sample = torch.load(REFERENCE / "last_v2_small_golden.pt", weights_only=True)["mib_sample"]
    out = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    out["val_center_crop"] = {k: v.numpy() for k, v in sample["val_center_crop"].items()}
    return out


@pytest.fixture(scope="module")
def parsed_reference() -> np.ndarray:
    return parse_skeleton_file(NTU_SAMPLE_SKELETON, body_assignment="reference").coords


@pytest.fixture(scope="module")
def parsed_tracked() -> np.ndarray:
    return parse_skeleton_file(NTU_SAMPLE_SKELETON, body_assignment="tracked").coords


def _shoulder_yaw_deg(x: np.ndarray, frame: int, body: int = 0) -> float:
    d = x[:, frame, st.RIGHT_SHOULDER, body] - x[:, frame, st.LEFT_SHOULDER, body]
    return float(np.degrees(np.arctan2(d[2], d[0])))


# ------------------------------------------------------------------------------------------------
# Reference pipeline vs golden
# ------------------------------------------------------------------------------------------------


def _check_all_intermediates(coords: np.ndarray, golden: dict) -> None:
    padded = st.reference_length(coords)
    np.testing.assert_allclose(padded, golden["raw_padded"], atol=ATOL, rtol=0)
    aligned = st.reference_centre(padded)
    np.testing.assert_allclose(aligned, golden["aligned"], atol=ATOL, rtol=0)
    rotated = st.reference_rotate(aligned)
    np.testing.assert_allclose(rotated, golden["rotated"], atol=ATOL, rtol=0)
    joint = st.reference_scale(rotated)
    np.testing.assert_allclose(joint, golden["joint"], atol=ATOL, rtol=0)
    full = st.reference_streams(coords)
    for k in STREAM_KEYS:
        assert full[k].dtype == np.float32 and full[k].shape == (3, 300, 25, 2)
        np.testing.assert_allclose(full[k], golden[k], atol=ATOL, rtol=0, err_msg=k)
    start = st.reference_crop_start(300, 64, None)
    window = st.reference_window(coords, start, 64)
    for k in STREAM_KEYS:
        np.testing.assert_allclose(
            st.reference_crop(full[k], start, 64), golden["val_center_crop"][k], atol=ATOL, rtol=0
        )
        np.testing.assert_allclose(window[k], golden["val_center_crop"][k], atol=ATOL, rtol=0, err_msg=k)


def test_reference_from_golden_raw_matches_every_intermediate(golden: dict) -> None:
    n = int(golden["num_raw_frames"])
    _check_all_intermediates(np.ascontiguousarray(golden["raw_padded"][:, :n]), golden)


def test_reference_from_parsed_file_matches_every_intermediate(golden: dict, parsed_reference: np.ndarray) -> None:
    assert parsed_reference.shape == (3, int(golden["num_raw_frames"]), 25, 2)
    _check_all_intermediates(parsed_reference, golden)


def test_reference_integer_facts(golden: dict, parsed_reference: np.ndarray) -> None:
    assert list(st.REFERENCE_BONE_PARENTS) == list(golden["bone_parent_0based"])
    assert parsed_reference.shape[1] == golden["num_raw_frames"] == 103
    # centre crop window = stored frames 118..181
    start = st.reference_crop_start(300, 64, None)
    assert start == 118
    np.testing.assert_array_equal(golden["val_center_crop"]["joint"], golden["joint"][:, 118:182])
    # the oddity: the 103-frame clip's centre window holds only copies of the last real frame
    window = st.reference_window(parsed_reference, start, 64)
    assert np.array_equal(window["velocity"], np.zeros_like(window["velocity"]))
    # training start is uniform over [0, 236] inclusive
    rng = np.random.default_rng(0)
    starts = {st.reference_crop_start(300, 64, rng) for _ in range(4000)}
    assert min(starts) == 0 and max(starts) == 236


def test_reference_rotation_doubles_shoulder_yaw(golden: dict) -> None:
    before = _shoulder_yaw_deg(golden["aligned"], 0)
    after = _shoulder_yaw_deg(st.reference_rotate(golden["aligned"]), 0)
    # spec 7.2: measured -28.74 deg before, -57.48 deg after
    assert before == pytest.approx(-28.74, abs=0.01)
    assert after == pytest.approx(-57.48, abs=0.01)


def test_reference_window_is_identical_to_full_pipeline(parsed_reference: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    base = np.concatenate([parsed_reference] * 5, axis=1)
    for frames in (1, 40, 103, 300, 450):
        coords = np.ascontiguousarray(base[:, :frames])
        coords[..., 1] = coords[..., 0] * 0.8 + 0.25  # a second body, present everywhere
        full = st.reference_streams(coords)
        for num in (16, 64, 320):
            for start in {0, st.reference_crop_start(300, num, None), st.reference_crop_start(300, num, rng)}:
                window = st.reference_window(coords, start, num)
                for k in STREAM_KEYS:
                    assert np.array_equal(window[k], st.reference_crop(full[k], start, num)), (frames, num, start, k)


def test_reference_length_subsamples_by_floor_linspace() -> None:
    frames = 450
    coords = np.zeros((3, frames, 25, 2), np.float32)
    coords[0] = np.arange(frames, dtype=np.float32)[:, None, None]  # x = raw frame number
    out = st.reference_length(coords)
    expected = [int(t * (frames - 1) / 299) for t in range(300)]  # floor of linspace(0, 449, 300)
    assert out[0, :, 0, 0].astype(int).tolist() == expected
    short = st.reference_length(coords[:, :10])
    assert short[0, :, 0, 0].tolist() == list(range(10)) + [9] * 290


def test_reference_absent_body_stays_zero(parsed_reference: np.ndarray) -> None:
    full = st.reference_streams(parsed_reference)
    for k in STREAM_KEYS:
        assert not full[k][..., 1].any()


def test_bad_coordinates_are_rejected() -> None:
    with pytest.raises(st.StreamError, match="shape"):
        st.reference_streams(np.zeros((3, 10, 24, 2), np.float32))
    with pytest.raises(st.StreamError, match="no frames"):
        st.reference_streams(np.zeros((3, 0, 25, 2), np.float32))
    bad = np.ones((3, 10, 25, 2), np.float32)
    bad[1, 4, 3, 0] = np.nan
    with pytest.raises(st.StreamError, match="NaN"):
        st.reference_window(bad, 0, 64)
    with pytest.raises(st.StreamError, match="numpy array"):
        st.reference_length([[0.0]])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Standard pipeline
# ------------------------------------------------------------------------------------------------


def test_ntu_bone_parents_form_the_graph_tree() -> None:
    edges = {frozenset((a - 1, b - 1)) for a, b in NTU_EDGES_1BASED}
    parents = st.NTU_BONE_PARENTS
    assert len(parents) == 25 and parents[20] == 20
    for v, p in enumerate(parents):
        if v != 20:
            assert frozenset((v, p)) in edges, (v, p)
            seen, u = set(), v
            while u != 20:  # every joint reaches the centre without a cycle
                assert u not in seen
                seen.add(u)
                u = parents[u]
    assert len({frozenset((v, p)) for v, p in enumerate(parents) if v != 20}) == len(edges)


def _expected_shared_norm(coords: np.ndarray, body: int) -> np.ndarray:
    """Independent float64 version of the standard normalisation: every body centred on ``body``'s
    spine base at its first present frame, yawed so that its shoulders lie along +X there, divided
    by its mean neck-spine length over its present frames; absent frames zero."""
    x = coords.astype(np.float64)
    present = np.abs(x).sum(axis=(0, 2)) > 0  # (L, M)
    f = int(np.flatnonzero(present[:, body])[0])
    origin = x[:, f, st.SPINE_BASE, body]
    d = x[:, f, st.RIGHT_SHOULDER, body] - x[:, f, st.LEFT_SHOULDER, body]
    theta = np.arctan2(d[2], d[0])
    # rotation about Y by -theta in the x-z plane: (cos t, sin t) -> (1, 0)
    rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    valid = present[:, body]
    scale = np.linalg.norm(x[:, valid, st.NECK, body] - x[:, valid, st.SPINE_BASE, body], axis=0).mean()
    out = np.einsum("ij,jtvm->itvm", rot, x - origin[:, None, None, None]) / scale
    return out * present[None, :, None, :]


def _rot_y(phi: float) -> np.ndarray:
    return np.array([[np.cos(phi), 0, np.sin(phi)], [0, 1, 0], [-np.sin(phi), 0, np.cos(phi)]])


def _forward(x: np.ndarray, frame: int, body: int) -> np.ndarray:
    """Unit facing direction in the ground plane: up x (left -> right shoulder)."""
    d = x[:, frame, st.RIGHT_SHOULDER, body] - x[:, frame, st.LEFT_SHOULDER, body]
    f = np.cross([0.0, 1.0, 0.0], [d[0], 0.0, d[2]])
    return f / np.linalg.norm(f)


def _facing_pair(parsed_tracked: np.ndarray) -> np.ndarray:
    """Body 0 = the real sample; body 1 = a rigid copy standing 1 m to body 0's right (along its
    frame-0 left -> right shoulder line, same height) and turned to face body 0."""
    coords = parsed_tracked.astype(np.float64)
    body = coords[..., 0]
    d = body[:, 0, st.RIGHT_SHOULDER] - body[:, 0, st.LEFT_SHOULDER]
    right = np.array([d[0], 0.0, d[2]]) / np.hypot(d[0], d[2])
    fwd = _forward(coords, 0, 0)
    # the quarter turn that makes the copy's forward point back at body 0 (-right)
    phi = min((np.pi / 2, -np.pi / 2), key=lambda p: np.linalg.norm(_rot_y(p) @ fwd + right))
    centre = body[:, 0, st.SPINE_BASE]
    other = np.einsum("ij,jtv->itv", _rot_y(phi), body - centre[:, None, None]) + (centre + right)[:, None, None]
    coords[..., 1] = other * (np.abs(body).sum(axis=0) > 0)  # present exactly when body 0 is
    return coords.astype(np.float32)


def test_standard_keeps_where_the_second_person_stands(parsed_tracked: np.ndarray) -> None:
    coords = _facing_pair(parsed_tracked)
    raw = coords.astype(np.float64)
    assert np.linalg.norm(raw[:, 0, st.SPINE_BASE, 1] - raw[:, 0, st.SPINE_BASE, 0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(
        _forward(raw, 0, 1) @ (raw[:, 0, st.SPINE_BASE, 0] - raw[:, 0, st.SPINE_BASE, 1]), 1.0, atol=1e-5
    )
    params = st.standard_norm_params(coords)
    assert params.body == 0
    joint = st.apply_norm(coords, params.present, params)
    np.testing.assert_allclose(joint, _expected_shared_norm(coords, 0), atol=1e-5)
    scale = np.linalg.norm(raw[:, :, st.NECK, 0] - raw[:, :, st.SPINE_BASE, 0], axis=0).mean()
    # body 0: centred at frame 0, shoulder line parallel to +X
    np.testing.assert_allclose(joint[:, 0, st.SPINE_BASE, 0], 0, atol=1e-6)
    d = joint[:, 0, st.RIGHT_SHOULDER, 0] - joint[:, 0, st.LEFT_SHOULDER, 0]
    assert abs(d[2]) < 1e-5 and d[0] > 0.1
    # spine-base distance of the two people, every frame, preserved up to the common scale
    dist_raw = np.linalg.norm(raw[:, :, st.SPINE_BASE, 1] - raw[:, :, st.SPINE_BASE, 0], axis=0)
    dist = np.linalg.norm(joint[:, :, st.SPINE_BASE, 1] - joint[:, :, st.SPINE_BASE, 0], axis=0)
    np.testing.assert_allclose(dist, dist_raw / scale, rtol=1e-5)
    assert dist.min() > 0.5
    # at frame 0 body 1 stands on body 0's right (+X), 1 m / scale away, facing body 0 (-X)
    np.testing.assert_allclose(joint[:, 0, st.SPINE_BASE, 1], [1.0 / scale, 0, 0], atol=1e-5)
    np.testing.assert_allclose(_forward(joint, 0, 1), [-1.0, 0, 0], atol=1e-5)
    # the whole standard pipeline (validation sampling starts at raw frame 0) keeps it too
    out, present, _ = st.standard_joint(coords, 64, rng=None)
    assert present.all()
    np.testing.assert_allclose(
        out[:, 0, st.SPINE_BASE, 1] - out[:, 0, st.SPINE_BASE, 0], [1.0 / scale, 0, 0], atol=1e-5
    )


def test_standard_main_body_absent_early_normalises_from_its_first_valid_frame(parsed_tracked: np.ndarray) -> None:
    coords = _facing_pair(parsed_tracked)
    coords[:, :12, :, 0] = 0  # body 0 appears at frame 12, body 1 is there from frame 0
    params = st.standard_norm_params(coords)
    assert params.body == 0 and (params.first, params.last) == (0, coords.shape[1] - 1)
    joint = st.apply_norm(coords, params.present, params)
    np.testing.assert_allclose(joint, _expected_shared_norm(coords, 0), atol=1e-5)
    np.testing.assert_allclose(joint[:, 12, st.SPINE_BASE, 0], 0, atol=1e-6)
    d = joint[:, 12, st.RIGHT_SHOULDER, 0] - joint[:, 12, st.LEFT_SHOULDER, 0]
    assert abs(d[2]) < 1e-5 and d[0] > 0.1
    valid = params.present[:, 0]
    lengths = np.linalg.norm(joint[:, valid, st.NECK, 0] - joint[:, valid, st.SPINE_BASE, 0], axis=0)
    assert lengths.mean() == pytest.approx(1.0, abs=1e-5)
    assert not joint[:, :12, :, 0].any()  # absent frames stay exactly zero
    assert params.present[:12, 1].all() and joint[:, :12, :, 1].any()  # body 1 is there meanwhile
    # body 1 is not re-centred on itself: at frame 0 its spine base is away from the origin
    assert np.linalg.norm(joint[:, 0, st.SPINE_BASE, 1]) > 0.5


def test_standard_uses_the_first_present_slot_when_slot_0_is_empty(parsed_tracked: np.ndarray) -> None:
    coords = _facing_pair(parsed_tracked)
    coords[..., 0] = 0
    coords[:, :5, :, 1] = 0
    params = st.standard_norm_params(coords)
    assert params.body == 1
    joint = st.apply_norm(coords, params.present, params)
    np.testing.assert_allclose(joint, _expected_shared_norm(coords, 1), atol=1e-5)
    np.testing.assert_allclose(joint[:, 5, st.SPINE_BASE, 1], 0, atol=1e-6)
    assert not joint[..., 0].any() and not joint[:, :5].any()


def test_standard_one_body_sample_is_normalised_on_its_own(parsed_tracked: np.ndarray) -> None:
    assert parsed_tracked[..., 0].any() and not parsed_tracked[..., 1].any()
    params = st.standard_norm_params(parsed_tracked)
    joint = st.apply_norm(parsed_tracked, params.present, params)
    # the same per-body normalisation as before the shared transform: centred at its first frame,
    # shoulders on +X there, unit mean neck-spine length; the empty slot stays zero
    np.testing.assert_allclose(joint, _expected_shared_norm(parsed_tracked, 0), atol=1e-5)
    np.testing.assert_allclose(joint[:, 0, st.SPINE_BASE, 0], 0, atol=1e-6)
    assert abs(_shoulder_yaw_deg(joint, 0)) < 1e-3
    lengths = np.linalg.norm(joint[:, :, st.NECK, 0] - joint[:, :, st.SPINE_BASE, 0], axis=0)
    assert lengths.mean() == pytest.approx(1.0, abs=1e-5)
    assert not joint[..., 1].any()
    # the reference, by contrast, doubles the yaw
    ref = st.reference_streams(parsed_tracked)["joint"]
    assert abs(_shoulder_yaw_deg(ref, 0)) > 50


def test_standard_short_clip_is_not_frozen(parsed_tracked: np.ndarray) -> None:
    coords = np.ascontiguousarray(parsed_tracked[:, 40:60])  # 20 frames of real motion
    joint, present, step = st.standard_joint(coords, 64, rng=None)
    streams = st.standard_streams(joint, present, step)
    assert joint.shape == (3, 64, 25, 2) and present[:, 0].all() and not present[:, 1].any()
    assert step == pytest.approx(19 / 63)
    moving = np.abs(streams["velocity"][..., 0]).max(axis=(0, 2)) > 1e-6
    assert moving.mean() > 0.9
    # validation sampling spans the whole clip: first and last frames are the raw first and last
    params = st.standard_norm_params(coords)
    ends = st.apply_norm(coords[:, [0, 19]], params.present[[0, 19]], params)
    np.testing.assert_allclose(joint[:, [0, 63]], ends, atol=1e-5)
    for k in STREAM_KEYS:  # absent second body stays zero in every stream
        assert not streams[k][..., 1].any()


def test_standard_velocity_is_per_raw_frame() -> None:
    # A rigid skeleton moving up (Y is not touched by the yaw) by 0.02 m per raw frame, neck-spine
    # length 0.5 m: normalised velocity is 0.04 per raw frame, whatever the clip length or crop.
    rng = np.random.default_rng(3)
    pose = rng.normal(size=(3, 25)).astype(np.float32)
    pose[:, st.NECK] = pose[:, st.SPINE_BASE] + np.array([0.0, 0.5, 0.0], np.float32)
    for frames in (20, 200):
        coords = np.zeros((3, frames, 25, 2), np.float32)
        coords[..., 0] = (
            pose[:, None, :] + np.array([0, 0.02, 0], np.float32)[:, None, None] * np.arange(frames)[None, :, None]
        )
        for sampler in (None, np.random.default_rng(frames)):
            joint, present, step = st.standard_joint(coords, 64, rng=sampler)
            vel = st.standard_velocity(joint, present, step)
            np.testing.assert_allclose(vel[1, :, :, 0], 0.04, atol=1e-4)
            np.testing.assert_allclose(vel[[0, 2], :, :, 0], 0.0, atol=1e-4)


def test_standard_training_windows_cover_a_random_fraction() -> None:
    rng = np.random.default_rng(0)
    lengths, starts = [], []
    for _ in range(500):
        pos, step = st.standard_positions(10, 110, 64, rng)
        assert 10 <= pos[0] <= pos[-1] <= 110 and np.all(np.diff(pos) >= 0)
        lengths.append(pos[-1] - pos[0])
        starts.append(pos[0])
        assert step == pytest.approx((pos[-1] - pos[0]) / 63)
    assert 50 - 1e-9 <= min(lengths) < 55 and 95 < max(lengths) <= 100
    assert min(starts) < 15 and max(starts) > 50
    pos, _ = st.standard_positions(10, 110, 64, None)
    np.testing.assert_allclose(pos, np.linspace(10, 110, 64))


def test_standard_resample_does_not_blend_absent_frames() -> None:
    coords = np.zeros((3, 4, 25, 2), np.float32)
    coords[..., 0] = 1.0
    coords[:, :2, :, 1] = 2.0  # body 1 present in frames 0-1 only
    present = st.presence(coords)
    out, pres = st.resample(coords, present, np.array([0.5, 1.4, 1.6, 3.0]))
    np.testing.assert_array_equal(out[0, :, 0, 1], [2.0, 2.0, 0.0, 0.0])  # nearest frame, never a blend
    np.testing.assert_array_equal(pres[:, 1], [True, True, False, False])
    np.testing.assert_array_equal(out[0, :, 0, 0], [1.0] * 4)


def test_standard_empty_sample_is_all_zero() -> None:
    joint, present, _ = st.standard_joint(np.zeros((3, 30, 25, 2), np.float32), 64, rng=None)
    assert joint.shape == (3, 64, 25, 2) and not joint.any() and not present.any()
