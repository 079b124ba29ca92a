"""NTU sample names, splits and the raw .skeleton parser (both body-assignment modes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lastkd.ntu.skeleton import (
    SampleNameError,
    SkeletonParseError,
    parse_sample_name,
    parse_skeleton_file,
    read_missing_list,
)
from lastkd.ntu.splits import split_indices
from tests.support.paths import NTU_SAMPLE_SKELETON, REFERENCE, SHARED

SAMPLE_BODY_ID = 72057594037931101  # the bodyID written in the shared sample file


def write_skeleton(path: Path, frames: list[list[tuple[object, np.ndarray]]]) -> Path:
    """Minimal independent writer: frames = [[(body id, xyz (25, 3)), ...], ...]."""
    lines = [str(len(frames))]
    for bodies in frames:
        lines.append(str(len(bodies)))
        for body_id, xyz in bodies:
            lines.append(f"{body_id} 0 1 1 1 1 0 0.01 0.02 2")
            lines.append("25")
            for x, y, z in np.asarray(xyz, dtype=np.float64).tolist():
                lines.append(f"{x!r} {y!r} {z!r} 250 200 1000 500 0.5 0.5 0.5 0.5 2")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the real sample against the reference pipeline's golden parse


def test_reference_parse_matches_golden_raw_padded() -> None:
    golden = torch.load(REFERENCE / "last_v2_small_golden.pt", weights_only=True)["mib_sample"]
    parsed = parse_skeleton_file(NTU_SAMPLE_SKELETON, "reference")
    assert parsed.frames == int(golden["num_raw_frames"]) == 103
    assert parsed.coords.shape == (3, 103, 25, 2) and parsed.coords.dtype == np.float32
    # the test's own padding (spec 7.1): repeat the last raw frame up to 300
    c = parsed.coords
    padded = np.concatenate([c, np.repeat(c[:, -1:], 300 - c.shape[1], axis=1)], axis=1)
    np.testing.assert_allclose(padded, golden["raw_padded"].numpy(), atol=1e-5, rtol=0)
    assert parsed.body_ids == [SAMPLE_BODY_ID] and isinstance(parsed.body_ids[0], int)
    assert parsed.n_bodies_seen == 1
    assert parsed.name == "S001C001P001R001A001"
    assert not parsed.coords[..., 1].any()  # second slot never used


def test_tracked_parse_of_single_body_sample_agrees_and_reads_first_joint_line() -> None:
    parsed = parse_skeleton_file(NTU_SAMPLE_SKELETON)  # default: tracked
    ref = parse_skeleton_file(NTU_SAMPLE_SKELETON, "reference")
    np.testing.assert_array_equal(parsed.coords, ref.coords)
    # first joint line of the file: "0.2181153 0.1725972 3.785547 ..."
    np.testing.assert_allclose(parsed.coords[:, 0, 0, 0], [0.2181153, 0.1725972, 3.785547], rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# body assignment on crafted multi-body files


def _pose(seed: int, frames: int, motion: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1, 1, size=(25, 3)) + (0, 0, 3)
    return np.round(base + motion * np.sin(np.arange(frames) / 3.0)[:, None, None], 4)


def test_tracked_drops_noise_bodies_and_keeps_slots(tmp_path: Path) -> None:
    n = 30
    a, b, noise = _pose(1, n, 0.3), _pose(2, n, 0.1), _pose(3, n, 0.5)
    frames = []
    for f in range(n):
        bodies: list[tuple[object, np.ndarray]] = []
        if 3 <= f < 8:  # a noise body listed first, tracked for 5 frames only
            bodies.append((99, noise[f]))
        if f >= 2:  # body B appears before A's slot order would suggest
            bodies.append((72057594037931102, b[f]))
        bodies.append((72057594037931101, a[f]))
        if f in (20, 21):
            bodies = []  # frames without bodies
        frames.append(bodies)
    path = write_skeleton(tmp_path / "S001C001P001R001A050.skeleton", frames)

    tracked = parse_skeleton_file(path, "tracked")
    assert tracked.n_bodies_seen == 3
    assert tracked.body_ids == [72057594037931101, 72057594037931102]  # order of first appearance
    np.testing.assert_allclose(tracked.coords[:, :2, :, 0].transpose(1, 2, 0), a[:2])
    for f in range(n):
        want_a = a[f] if f not in (20, 21) else np.zeros((25, 3))
        want_b = b[f] if f >= 2 and f not in (20, 21) else np.zeros((25, 3))
        np.testing.assert_allclose(tracked.coords[:, f, :, 0].T, want_a, atol=1e-6)
        np.testing.assert_allclose(tracked.coords[:, f, :, 1].T, want_b, atol=1e-6)

    reference = parse_skeleton_file(path, "reference")
    for f in range(n):
        listed = frames[f]
        for slot in range(2):
            want = listed[slot][1] if slot < len(listed) else np.zeros((25, 3))
            np.testing.assert_allclose(reference.coords[:, f, :, slot].T, want, atol=1e-6)
    assert reference.coords[:, 20].sum() == 0 and reference.coords[:, 21].sum() == 0


def test_tracked_keeps_the_two_bodies_with_most_motion(tmp_path: Path) -> None:
    n = 20
    still, mover, dancer = _pose(1, n, 0.0), _pose(2, n, 0.2), _pose(3, n, 0.6)
    frames = [[("7", still[f]), ("8", mover[f]), ("9", dancer[f])] for f in range(n)]
    parsed = parse_skeleton_file(write_skeleton(tmp_path / "x.skeleton", frames), "tracked")
    assert parsed.body_ids == [8, 9]  # integer-looking ids come back as exact ints
    np.testing.assert_allclose(parsed.coords[:, :, :, 0].transpose(1, 2, 0), mover, atol=1e-6)
    np.testing.assert_allclose(parsed.coords[:, :, :, 1].transpose(1, 2, 0), dancer, atol=1e-6)


def test_non_integer_body_id_kept_as_string(tmp_path: Path) -> None:
    pose = _pose(4, 12, 0.1)
    parsed = parse_skeleton_file(write_skeleton(tmp_path / "y.skeleton", [[("body-A", p)] for p in pose]))
    assert parsed.body_ids == ["body-A"]


def test_zero_frame_file_parses_to_empty_array(tmp_path: Path) -> None:
    path = tmp_path / "z.skeleton"
    path.write_text("0\n")
    parsed = parse_skeleton_file(path)
    assert parsed.frames == 0 and parsed.coords.shape == (3, 0, 25, 2)


def test_bad_body_assignment_rejected() -> None:
    with pytest.raises(ValueError, match="body_assignment"):
        parse_skeleton_file(NTU_SAMPLE_SKELETON, "sorted")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# malformed files: file, line and reason

REAL_LINES = NTU_SAMPLE_SKELETON.read_text().splitlines()


def _edit(lines: list[str], index: int, value: str) -> str:
    out = list(lines)
    out[index] = value
    return "\n".join(out) + "\n"


MALFORMED = {
    "empty": (b"", 1, "empty file"),
    "blank": (b"\n\n  \n", 1, "empty file"),
    "binary": (bytes(range(256)) * 4, 1, "binary data"),
    "nul": (b"103\n1\n\x00\x00\n", 3, "byte 0x00"),
    "negative_frames": (b"-5\n", 1, "outside 0..20000"),
    "huge_frames": (b"99999999999\n", 1, "outside 0..20000"),
    "frames_not_int": (b"1.5e2\n", 1, "not an integer"),
    "truncated_mid_body": ("\n".join(REAL_LINES[:40]).encode(), 40, "truncated"),
    "truncated_frames": ("\n".join(REAL_LINES[:-27]).encode(), 2858, "truncated"),
    "declared_too_few": (_edit(REAL_LINES, 0, "102").encode(), 2858, "frame count mismatch"),
    "non_numeric_joint": (
        _edit(REAL_LINES, 8, REAL_LINES[8].replace("0.1109304", "0.11x")).encode(),
        9,
        "non-numeric value '0.11x'",
    ),
    "wrong_joint_count": (_edit(REAL_LINES, 3, "24").encode(), 4, "wrong joint count 24"),
    "short_joint_line": (
        _edit(REAL_LINES, 5, " ".join(REAL_LINES[5].split()[:11])).encode(),
        6,
        "11 values, expected 12",
    ),
    "short_body_info": (_edit(REAL_LINES, 2, "72057594037931101 0 1").encode(), 3, "3 values, expected 10"),
    "nan_coordinate": (_edit(REAL_LINES, 10, "nan " + " ".join(REAL_LINES[10].split()[1:])).encode(), 11, "not finite"),
    "huge_bodies": (_edit(REAL_LINES, 1, "1000").encode(), 2, "body count of frame 1 1000 outside"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_reports_file_line_reason(tmp_path: Path, case: str) -> None:
    content, line, reason = MALFORMED[case]
    path = tmp_path / f"{case}.skeleton"
    path.write_bytes(content)
    with pytest.raises(SkeletonParseError) as info:
        parse_skeleton_file(path)
    err = info.value
    assert err.path == str(path)
    assert reason in err.reason, err.reason
    assert err.line == line, str(err)
    assert str(err).startswith(f"{path}:{line}: ")


def test_unreadable_path_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(SkeletonParseError, match="cannot read"):
        parse_skeleton_file(tmp_path / "absent.skeleton")


# ---------------------------------------------------------------------------------------------
# sample names and splits


def test_parse_sample_name_fields_and_label() -> None:
    s = parse_sample_name("S001C002P003R002A013")
    assert (s.setup, s.camera, s.performer, s.replication, s.action) == (1, 2, 3, 2, 13)
    assert s.label == 12 and str(s) == "S001C002P003R002A013"
    assert parse_sample_name("S032C003P106R002A120", "ntu120").label == 119


@pytest.mark.parametrize(
    "name,dataset",
    [
        ("S001C002P003R002A013.skeleton", "ntu120"),
        ("s001c002p003r002a013", "ntu120"),
        ("S01C002P003R002A013", "ntu120"),
        ("S001C004P003R002A013", "ntu120"),  # camera 4
        ("S001C001P003R003A013", "ntu120"),  # replication 3
        ("S000C001P003R001A013", "ntu120"),  # setup 0
        ("S001C001P003R001A000", "ntu120"),  # action 0
        ("S033C001P003R001A013", "ntu120"),
        ("S018C001P003R001A013", "ntu60"),  # setup beyond NTU60
        ("S001C001P041R001A013", "ntu60"),  # performer beyond NTU60
        ("S001C001P001R001A061", "ntu60"),  # action beyond NTU60
        ("", "ntu60"),
    ],
)
def test_parse_sample_name_rejects(name: str, dataset: str) -> None:
    with pytest.raises(SampleNameError):
        parse_sample_name(name, dataset)  # type: ignore[arg-type]


def test_splits_follow_the_protocol_lists() -> None:
    names = [
        "S001C001P001R001A001",  # P1 xsub train, C1 xview val, S1 odd
        "S002C002P003R001A002",  # P3 xsub val, C2 train, S2 even
        "S003C003P038R002A003",  # P38 train, C3 train
        "S004C001P045R001A004",  # P45: val for xsub (not in 1-40 list), train for xsub120
        "S005C002P044R001A005",  # P44: val for both
        "S006C003P103R001A006",  # P103: xsub120 train
    ]
    assert [list(x) for x in split_indices(names, "xsub")] == [[0, 2], [1, 3, 4, 5]]
    assert [list(x) for x in split_indices(names, "xview")] == [[1, 2, 4, 5], [0, 3]]
    assert [list(x) for x in split_indices(names, "xsub120")] == [[0, 2, 3, 5], [1, 4]]
    assert [list(x) for x in split_indices(names, "xset120")] == [[1, 3, 5], [0, 2, 4]]
    with pytest.raises(ValueError, match="split"):
        split_indices(names, "xfoo")
    with pytest.raises(ValueError, match="sample 1"):
        split_indices(["S001C001P001R001A001", "clip.avi"], "xsub")


def test_xsub_list_counts() -> None:
    performers = [f"S001C001P{p:03d}R001A001" for p in range(1, 41)]
    train, val = split_indices(performers, "xsub")
    assert len(train) == 20 and len(val) == 20
    p120 = [f"S001C001P{p:03d}R001A001" for p in range(1, 107)]
    train120, _ = split_indices(p120, "xsub120")
    assert len(train120) == 53


def test_official_missing_lists_read() -> None:
    assert len(read_missing_list(SHARED / "data" / "ntu60_samples_with_missing_skeletons.txt")) == 302
    assert len(read_missing_list(SHARED / "data" / "ntu120_samples_with_missing_skeletons.txt")) == 535


def test_missing_list_with_bad_line_named(tmp_path: Path) -> None:
    bad = tmp_path / "missing.txt"
    bad.write_text("S001C002P005R002A008\n# comment\n\nnot-a-name\n")
    with pytest.raises(ValueError, match=r"missing.txt:4:"):
        read_missing_list(bad)
