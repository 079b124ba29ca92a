"""``lastkd transcode``: every frame kept at the new size, resumable, bad files named, nothing partial."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from lastkd.services import cli
from lastkd.teacher.transcode import transcode_file, transcode_tree
from lastkd.teacher.video import PreprocessConfig, VideoLimits, decode_clip, probe
from tests.support.paths import NTU_SAMPLE_VIDEO


def test_the_ntu_clip_keeps_every_frame_at_the_new_size(tmp_path: Path) -> None:
    dst = tmp_path / "S001C001P001R001A001_rgb.avi"
    written = transcode_file(NTU_SAMPLE_VIDEO, dst, 256)
    src_info, out_info = probe(NTU_SAMPLE_VIDEO, VideoLimits()), probe(dst, VideoLimits())
    assert written == out_info.frames >= src_info.frames
    assert (out_info.width, out_info.height) == (456, 256)  # 1920x1080 -> short side 256, even sides
    assert out_info.fps == pytest.approx(src_info.fps, rel=1e-3)
    # what the teacher sees (short side 224, centre crop) is nearly the same picture
    cfg = PreprocessConfig(num_frames=8, size=224)
    a = decode_clip(NTU_SAMPLE_VIDEO, cfg, VideoLimits()).views.astype(np.float32)
    b = decode_clip(dst, cfg, VideoLimits()).views.astype(np.float32)
    assert np.abs(a - b).mean() < 6.0  # of 255: resize twice + re-encode, no shift or colour change


def test_a_tree_is_resumable_and_bad_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(NTU_SAMPLE_VIDEO, src / "S001C001P001R001A001_rgb.avi")
    shutil.copy(NTU_SAMPLE_VIDEO, src / "sub" / "S001C002P001R001A001_rgb.avi")
    (src / "S001C003P001R001A001_rgb.avi").write_bytes(NTU_SAMPLE_VIDEO.read_bytes()[:4000])  # truncated
    (src / "notes.txt").write_text("not a video")
    dst = tmp_path / "dst"
    first = transcode_tree(src, dst, 64, workers=2)
    assert sorted(p.name for p in first.written) == ["S001C001P001R001A001_rgb.avi", "S001C002P001R001A001_rgb.avi"]
    assert list(first.failed) == [src / "S001C003P001R001A001_rgb.avi"]
    assert sorted(p.name for p in dst.rglob("*")) == [
        "S001C001P001R001A001_rgb.avi",
        "S001C002P001R001A001_rgb.avi",
        "sub",
    ]
    again = transcode_tree(src, dst, 64)
    assert again.written == [] and len(again.skipped) == 2  # done files are not redone
    # the command line says the same, with exit 1 for the unreadable file
    assert cli.main(["transcode", str(src), str(dst), "--short-side", "64", "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert "already done 2, failed 1" in captured.out and "S001C003P001R001A001_rgb.avi" in captured.err
    assert cli.main(["transcode", str(src), str(src / "out")]) == 2
    assert "must not be the source folder or inside it" in capsys.readouterr().err
    with av.open(str(dst / "sub" / "S001C002P001R001A001_rgb.avi")) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
