"""Video pipeline: real decoding of the NTU clip and of clips encoded here with PyAV, sampling,
crops, both preprocessing protocols, limits, and truly bad files.

Expected values come from the spec (videomae_v2.md section 7, ntu_data.md), from formulas written
out independently here, or from an independent decode with PyAV directly.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import av
import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from lastkd.teacher.video import (
    PreprocessConfig,
    VideoError,
    VideoLimits,
    crop_offsets,
    decode_clip,
    load_clip,
    multiview_indices,
    normalize,
    prepare_clip,
    probe,
    resized_size,
    uniform_indices,
)
from tests.support import media
from tests.support.paths import NTU_SAMPLE_VIDEO

LIMITS = VideoLimits()
UNIFORM = PreprocessConfig()
MULTIVIEW = PreprocessConfig(sampling="multiview")
OFFICIAL = PreprocessConfig(protocol="official_extraction")
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def expected_uniform(length: int, t: int = 16) -> list[int]:
    """Independent statement of the documented rule: round-half-up of i*(L-1)/(T-1)."""
    return [int(math.floor(i * (length - 1) / (t - 1) + 0.5)) for i in range(t)]


def indices_of(views: np.ndarray) -> np.ndarray:
    """Frame numbers of an 'index'-pattern clip, read back from every output frame: (V, T)."""
    return np.array([[media.read_index(f) for f in view] for view in views])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


# --------------------------------------------------------------------------------------------
# the real NTU clip


@pytest.fixture(scope="module")
def ntu_uniform() -> np.ndarray:
    return prepare_clip(NTU_SAMPLE_VIDEO, UNIFORM, LIMITS, threads=1)


def test_ntu_probe_matches_spec():
    info = probe(NTU_SAMPLE_VIDEO, LIMITS)
    assert (info.frames, info.width, info.height, info.codec, info.container) == (103, 1920, 1080, "h264", "avi")
    assert info.fps == pytest.approx(30.0)
    assert info.duration == pytest.approx(103 / 30, abs=0.05)


def test_ntu_uniform_shape_range_and_motion(ntu_uniform):
    assert ntu_uniform.shape == (1, 16, 224, 224, 3) and ntu_uniform.dtype == np.uint8
    assert ntu_uniform.min() < 30 and ntu_uniform.max() > 200  # a real picture, not a flat fill
    diffs = [np.abs(ntu_uniform[0, t].astype(int) - ntu_uniform[0, t + 1]).mean() for t in range(15)]
    assert min(diffs) > 0.2  # every sampled frame is a different frame


def test_ntu_uniform_indices_cover_start_to_end():
    idx = uniform_indices(103, 16)
    assert idx == expected_uniform(103)
    assert idx[0] == 0 and idx[-1] == 102
    assert all(b > a for a, b in zip(idx, idx[1:]))


def test_ntu_sampled_frame_matches_independent_decode(ntu_uniform):
    """Decode every frame with PyAV directly, pick sampled frame t=7 (frame 48), compare."""
    target = expected_uniform(103)[7]
    assert target == 48
    window = range(target - 4, target + 5)
    full: dict[int, np.ndarray] = {}
    with av.open(str(NTU_SAMPLE_VIDEO)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in window:
                full[i] = frame
        assert i == 102
    # short side 1080 -> 224, long side floor(224 * 1920 / 1080) = 398, centre crop round(174 / 2) = 87
    ours = ntu_uniform[0, 7].astype(np.float64)
    same_scaler = {
        i: f.to_ndarray(width=398, height=224, format="rgb24", interpolation="BILINEAR")[:, 87:311]
        for i, f in full.items()
    }
    errs = {i: np.abs(ref - ours).mean() for i, ref in same_scaler.items()}
    assert min(errs, key=errs.get) == target
    assert errs[target] < 0.05
    # a different resampler (PyTorch bilinear with antialiasing on the full RGB frame) agrees closely
    rgb = torch.from_numpy(full[target].to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float()
    torch_ref = F.interpolate(rgb, size=(224, 398), mode="bilinear", antialias=True, align_corners=False)
    torch_ref = torch_ref[0].permute(1, 2, 0)[:, 87:311].numpy()
    assert np.abs(torch_ref - ours).mean() < 1.5


def test_ntu_multiview_views_and_crops():
    out = prepare_clip(NTU_SAMPLE_VIDEO, MULTIVIEW, LIMITS)
    assert out.shape == (15, 16, 224, 224, 3)
    # 26 sampled frames (0, 4, ..., 100); step (26 - 16) / 4 = 2.5 -> starts 0, 2, 5, 7, 10
    views = multiview_indices(103, MULTIVIEW)
    assert [v[0] for v in views] == [0, 8, 20, 28, 40] and views[-1][-1] == 100
    # crops of one resized 398x224 frame at x = 0, 87, 174 overlap exactly
    assert crop_offsets(398, 224, 3) == [0, 87, 174]
    for k in range(5):
        left, centre, right = out[3 * k], out[3 * k + 1], out[3 * k + 2]
        np.testing.assert_array_equal(left[:, :, 87:], centre[:, :, :137])
        np.testing.assert_array_equal(centre[:, :, 87:], right[:, :, :137])
    # temporal view 0 and 1 are different frames
    assert np.abs(out[0].astype(int) - out[3]).mean() > 0.2


def test_threads_do_not_change_the_output(ntu_uniform):
    np.testing.assert_array_equal(prepare_clip(NTU_SAMPLE_VIDEO, UNIFORM, LIMITS, threads=0), ntu_uniform)


# --------------------------------------------------------------------------------------------
# clips encoded here: containers, codecs, frame rates, lengths


CONTAINERS = [
    ("mp4", "h264", False),
    ("mp4", "h264", True),
    ("mkv", "h264", False),
    ("mkv", "mpeg4", True),
    ("webm", "vp9", False),
    ("webm", "vp9", True),
    ("avi", "mpeg4", False),
    ("avi", "mpeg4", True),  # VFR in AVI: declared count includes dropped-frame slots
]


@pytest.mark.parametrize("container,codec,vfr", CONTAINERS)
def test_uniform_sampling_picks_the_right_frames(clips, container, codec, vfr):
    path = media.make_clip(
        clips / f"idx_{codec}_{vfr}.{container}", container, codec, frames=37, size=(64, 48), vfr=vfr, pattern="index"
    )
    info = probe(path, LIMITS)
    assert (info.width, info.height) == (64, 48)
    if not vfr or container != "avi":
        assert info.frames == 37
    out = prepare_clip(path, UNIFORM, LIMITS)
    assert out.shape == (1, 16, 224, 224, 3)
    assert indices_of(out)[0].tolist() == expected_uniform(37)


def test_vfr_duration_comes_from_timestamps(clips):
    path = media.make_clip(clips / "vfr.mkv", "mkv", "h264", frames=12, size=(64, 48), vfr=True, pattern="index")
    info = probe(path, LIMITS)
    gaps = [media.VFR_GAPS_MS[i % 6] for i in range(11)]
    assert info.frames == 12
    assert info.duration == pytest.approx(sum(gaps) / 1000, abs=0.06)


@pytest.mark.parametrize("frames", [1, 2, 5, 15])
def test_short_clips_repeat_frames(clips, frames):
    path = media.make_clip(clips / f"short{frames}.mp4", frames=frames, size=(64, 48), pattern="index")
    out = prepare_clip(path, UNIFORM, LIMITS)
    got = indices_of(out)[0].tolist()
    if frames == 1:
        assert got == [0] * 16
    else:
        assert got == expected_uniform(frames)
        assert got[0] == 0 and got[-1] == frames - 1
    assert sorted(set(got)) == list(range(frames))  # every frame used, none invented


@pytest.mark.parametrize("frames,used", [(1, 1), (5, 5), (15, 15), (40, 16)])
def test_frames_used_counts_the_real_distinct_frames(clips, frames, used):
    path = media.make_clip(clips / f"used{frames}.mp4", frames=frames, size=(64, 48), pattern="index")
    clip = decode_clip(path, UNIFORM, LIMITS)
    # Independent count: the distinct frame numbers painted into the output frames.
    assert clip.frames_used == used == len(set(indices_of(clip.views)[0].tolist()))


@pytest.mark.faults
def test_min_frames_refuses_shorter_clips_with_a_clear_reason(clips):
    one = media.make_clip(clips / "min1.mp4", frames=1, size=(64, 48), pattern="index")
    five = media.make_clip(clips / "min5.mp4", frames=5, size=(64, 48), pattern="index")
    err = reason_of(one, limits=VideoLimits(min_frames=2))
    assert err.reason == "too_short" and "1 frame" in str(err) and "minimum of 2" in str(err)
    assert reason_of(five, limits=VideoLimits(min_frames=6)).reason == "too_short"
    # At the threshold the clip is accepted, and min_frames above num_frames is about the clip.
    assert decode_clip(five, UNIFORM, VideoLimits(min_frames=5)).frames_used == 5
    long = media.make_clip(clips / "min40.mp4", frames=40, size=(64, 48), pattern="index")
    assert decode_clip(long, UNIFORM, VideoLimits(min_frames=32)).frames_used == 16
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="min_frames"):
            VideoLimits(min_frames=bad)


def test_multiview_indices_match_spec_worked_example():
    views = multiview_indices(300, MULTIVIEW)  # spec 7.1: L = 300 -> 75 sampled, starts 0, 14, 29, 44, 59
    assert [v[0] // 4 for v in views] == [0, 14, 29, 44, 59]
    assert views[-1][0] == 236 and views[-1][-1] == 296
    assert all(v == list(range(v[0], v[0] + 64, 4)) for v in views)


def test_multiview_short_clip_pads_with_last_sampled_frame(clips):
    path = media.make_clip(clips / "mv_idx.mkv", "mkv", "h264", frames=30, size=(64, 48), pattern="index")
    out = prepare_clip(path, MULTIVIEW, LIMITS)
    assert out.shape == (15, 16, 224, 224, 3)
    # every 4th of 30 frames: 0..28 (8 frames), padded with 28 to 16; one window, repeated 5 times
    expected = [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8
    assert indices_of(out).tolist() == [expected] * 15


def test_multiview_landscape_crops_left_centre_right(clips):
    path = media.make_clip(clips / "cols_land.mp4", frames=8, size=(320, 240), pattern="columns")
    # spec 7.1 worked example: 320x240 -> 298x224, crop x-offsets 0, 37, 74
    assert resized_size(320, 240, MULTIVIEW) == (298, 224)
    assert crop_offsets(298, 224, 3) == [0, 37, 74]
    cfg = PreprocessConfig(sampling="multiview", temporal_views=2)
    out = prepare_clip(path, cfg, LIMITS)
    assert out.shape == (6, 16, 224, 224, 3)
    for view in range(6):
        red_left = out[view, 0, 100:124, 0, 0].astype(float).mean()
        offset = [0, 37, 74][view % 3]
        x_source = (offset + 0.5) * 320 / 298 - 0.5  # pixel-centre mapping of the resize
        assert red_left == pytest.approx(255 * x_source / 319, abs=5), view
        green = out[view, 0, :, 112, 1].astype(float)  # the full height is kept
        assert green[0] < 8 and green[-1] > 247
    # neighbouring crops of the same frame overlap exactly by 224 - 37 columns
    np.testing.assert_array_equal(out[0, :, :, 37:], out[1, :, :, :187])


def test_multiview_portrait_crops_top_centre_bottom(clips):
    path = media.make_clip(clips / "cols_port.mp4", frames=8, size=(240, 320), pattern="columns")
    assert resized_size(240, 320, MULTIVIEW) == (224, 298)
    out = prepare_clip(path, PreprocessConfig(sampling="multiview", temporal_views=1), LIMITS)
    assert out.shape == (3, 16, 224, 224, 3)
    for view, offset in enumerate([0, 37, 74]):
        green_top = out[view, 0, 0, 100:124, 1].astype(float).mean()
        y_source = (offset + 0.5) * 320 / 298 - 0.5
        assert green_top == pytest.approx(255 * y_source / 319, abs=5), view
        red = out[view, 0, 112, :, 0].astype(float)
        assert red[0] < 8 and red[-1] > 247


@pytest.mark.parametrize("size,axis", [((320, 240), 1), ((240, 320), 0)])
def test_uniform_imagenet_centre_crop(clips, size, axis):
    path = media.make_clip(clips / f"centre_{size[0]}x{size[1]}.mp4", frames=4, size=size, pattern="columns")
    out = prepare_clip(path, UNIFORM, LIMITS)[0, 0].astype(float)
    offset = round((298 - 224) / 2)  # spec 7.1 validation mode: round((size - 224) / 2) = 37
    start = (offset + 0.5) * 320 / 298 - 0.5
    end = (offset + 223 + 0.5) * 320 / 298 - 0.5
    channel = 0 if axis == 1 else 1  # red runs along x, green along y
    profile = out[:, :, channel].mean(axis=1 - axis)
    assert profile[0] == pytest.approx(255 * start / 319, abs=5)
    assert profile[-1] == pytest.approx(255 * end / 319, abs=5)
    across = out[:, :, 1 - channel].mean(axis=axis)  # the short side is kept whole
    assert across[0] < 8 and across[-1] > 247


def test_official_extraction_squashes_whole_frame_without_mean_std(clips):
    path = media.make_clip(clips / "cols_squash.mp4", frames=4, size=(320, 240), pattern="columns")
    raw = prepare_clip(path, OFFICIAL, LIMITS)
    assert raw.shape == (1, 16, 224, 224, 3)
    frame = raw[0, 0].astype(float)
    assert frame[:, 0, 0].mean() < 8 and frame[:, -1, 0].mean() > 247  # all columns kept
    assert frame[0, :, 1].mean() < 8 and frame[-1, :, 1].mean() > 247  # all rows kept
    x = load_clip(path, OFFICIAL, LIMITS)
    assert x.shape == (1, 3, 16, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(raw).permute(0, 4, 1, 2, 3).float() / 255)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_imagenet_protocol_values(clips):
    path = media.make_clip(clips / "idx_norm.mp4", frames=16, size=(64, 48), pattern="index")
    x = load_clip(path, UNIFORM, LIMITS)
    assert x.shape == (1, 3, 16, 224, 224)
    for t in range(16):
        level = media.index_level(t) / 255
        want = (level - MEAN) / STD
        got = x[0, :, t].mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(got, want, atol=3 / 255 / STD.min())


def test_normalize_layout_and_formulas():
    rng = np.random.default_rng(1)
    cfg = PreprocessConfig(num_frames=2, size=8)
    clips = rng.integers(0, 256, (3, 2, 8, 8, 3), dtype=np.uint8)
    got = normalize(torch.from_numpy(clips), cfg).numpy()
    want = ((clips / 255.0 - MEAN) / STD).transpose(0, 4, 1, 2, 3)
    assert got.shape == (3, 3, 2, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    raw = normalize(clips, PreprocessConfig(num_frames=2, size=8, protocol="official_extraction")).numpy()
    np.testing.assert_allclose(raw, (clips / 255.0).transpose(0, 4, 1, 2, 3), atol=1e-6)


def test_normalize_rejects_wrong_input():
    cfg = PreprocessConfig(num_frames=2, size=8)
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 2, 8, 8, 3), cfg)
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8).permute(0, 4, 1, 2, 3), cfg)
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), cfg)


# --------------------------------------------------------------------------------------------
# configuration


def test_config_contract():
    assert UNIFORM.num_views == 1 and MULTIVIEW.num_views == 15
    assert PreprocessConfig(sampling="multiview", temporal_views=2, spatial_crops=1).num_views == 2
    # settings that do not apply to uniform sampling do not change its identity
    assert PreprocessConfig(stride=8).as_dict() == UNIFORM.as_dict()
    assert MULTIVIEW.as_dict() != PreprocessConfig(sampling="multiview", stride=2).as_dict()
    assert UNIFORM.as_dict() != OFFICIAL.as_dict()
    assert UNIFORM.as_dict()["mean"] == [0.485, 0.456, 0.406] and OFFICIAL.as_dict()["mean"] is None
    with pytest.raises(pydantic.ValidationError):
        UNIFORM.size = 112  # frozen
    with pytest.raises(pydantic.ValidationError, match="extra"):
        PreprocessConfig(frames=16)
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(num_frames=0)
    with pytest.raises(pydantic.ValidationError, match="spatial_crops=1"):
        PreprocessConfig(sampling="multiview", protocol="official_extraction")
    assert PreprocessConfig(sampling="multiview", protocol="official_extraction", spatial_crops=1).num_views == 5


def test_limits_reject_nonsense():
    for bad in (dict(max_bytes=0), dict(max_seconds=-1.0), dict(max_pixels=float("inf")), dict(max_bytes=True)):
        with pytest.raises(ValueError):
            VideoLimits(**bad)


def test_uniform_indices_rejects_empty():
    with pytest.raises(ValueError):
        uniform_indices(0, 16)


# --------------------------------------------------------------------------------------------
# bad input


def reason_of(path, cfg=UNIFORM, limits=LIMITS) -> VideoError:
    with pytest.raises(VideoError) as info:
        prepare_clip(path, cfg, limits)
    assert str(info.value) and info.value.message == str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))  # decode workers send errors across processes
    assert (copy.reason, copy.message) == (info.value.reason, info.value.message)
    return info.value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_not_media(clips, seed):
    err = reason_of(media.make_random_bytes(clips / f"random{seed}.mp4", seed=seed))
    assert err.reason == "not_media" and "not a media file" in str(err)


def test_text_file_is_not_media(clips):
    # FFmpeg would open *.txt as an 'ANSI art' video if it were allowed to guess the format
    err = reason_of(media.make_text_file(clips / "notes.txt"))
    assert err.reason == "not_media"


def test_empty_file_is_not_media(clips):
    err = reason_of(media.make_empty_file(clips / "empty.mp4"))
    assert err.reason == "not_media" and "empty" in str(err)


def test_directory_and_missing_file(clips):
    assert reason_of(clips).reason == "not_media"
    with pytest.raises(FileNotFoundError):
        prepare_clip(clips / "missing.mp4", UNIFORM, LIMITS)


def test_protocol_like_file_name_is_just_a_name(clips):
    path = media.make_clip(clips / "concat:evil.mp4", frames=4, size=(64, 48), pattern="index")
    assert prepare_clip(path, UNIFORM, LIMITS).shape == (1, 16, 224, 224, 3)


def test_truncated_mp4_is_corrupt(clips):
    src = media.make_clip(clips / "whole.mp4", frames=30, size=(160, 120))
    err = reason_of(media.truncated_copy(src, clips / "cut.mp4", 0.5))
    assert err.reason == "corrupt" and "mov" in str(err)


def test_truncated_ntu_avi_is_corrupt(clips):
    err = reason_of(media.truncated_copy(NTU_SAMPLE_VIDEO, clips / "cut_ntu.avi", 0.5))
    assert err.reason == "corrupt"


def test_corrupted_bytes_in_ntu_avi_are_detected(clips):
    err = reason_of(media.corrupted_copy(NTU_SAMPLE_VIDEO, clips / "bad_ntu.avi", at=0.5, length=4096))
    assert err.reason == "corrupt" and "frame" in str(err)


@pytest.mark.parametrize("kind", ["wav", "mp3", "ogg"])
def test_audio_only_has_no_video_stream(clips, kind):
    err = reason_of(media.make_audio(clips / f"sound.{kind}", kind))
    assert err.reason == "no_video_stream" and "audio" in str(err)


def test_bare_mpeg_audio_has_no_video_stream(clips):
    bare = media.without_id3(media.make_audio(clips / "tagged.mp3", "mp3"), clips / "bare.mp3")
    assert bare.read_bytes()[:1] == b"\xff"
    assert reason_of(bare).reason == "no_video_stream"


def test_video_stream_without_frames(clips):
    err = reason_of(media.make_video_without_frames(clips / "noframes.mkv"))
    assert err.reason == "no_frames"


# --------------------------------------------------------------------------------------------
# limits


def test_too_large_checked_before_opening(clips):
    path = media.make_random_bytes(clips / "big.bin", size=5000)  # not even media: size comes first
    err = reason_of(path, limits=VideoLimits(max_bytes=4999))
    assert err.reason == "too_large" and "4999" in str(err)


def test_too_long_from_container(clips):
    path = media.make_clip(clips / "long.mp4", frames=30, size=(64, 48), fps=25)  # 1.2 s
    assert probe(path, VideoLimits(max_seconds=1.5)).frames == 30
    with pytest.raises(VideoError) as info:
        probe(path, VideoLimits(max_seconds=1.0))
    assert info.value.reason == "too_long" and "1.20 s" in str(info.value)


def test_too_long_without_declared_duration_is_caught_while_reading(clips):
    path = media.make_clip(
        clips / "nodur.mkv", "mkv", "h264", frames=30, size=(64, 48), fps=25, seekable=False, pattern="index"
    )
    with av.open(str(path)) as c:  # the premise: nothing in the header says how long it is
        assert c.duration is None and c.streams.video[0].frames == 0
    info = probe(path, VideoLimits(max_seconds=2.0))
    assert info.frames == 30 and info.duration == pytest.approx(1.2, abs=0.05)
    err = reason_of(path, limits=VideoLimits(max_seconds=1.0))
    assert err.reason == "too_long" and "reading" in str(err)
    assert indices_of(prepare_clip(path, UNIFORM, LIMITS))[0].tolist() == expected_uniform(30)


def test_resolution_limit(clips):
    path = media.make_clip(clips / "res.mp4", frames=3, size=(320, 240))
    assert probe(path, VideoLimits(max_pixels=320 * 240)).width == 320
    err = reason_of(path, limits=VideoLimits(max_pixels=320 * 240 - 1))
    assert err.reason == "resolution" and "320x240" in str(err)


def test_extreme_aspect_ratio_is_refused(clips):
    path = media.make_clip(clips / "strip.mp4", frames=3, size=(320, 32))
    err = reason_of(path)
    assert err.reason == "resolution" and "aspect" in str(err)


def test_threads_argument_is_checked(clips):
    path = media.make_clip(clips / "thr.mp4", frames=3, size=(64, 48))
    with pytest.raises(ValueError, match="threads"):
        prepare_clip(path, UNIFORM, LIMITS, threads=-1)
