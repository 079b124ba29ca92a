"""The throughput engine in-process: real decoder processes, real LMDB, the tiny teacher."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lastkd.featurestore import FeatureStore
from lastkd.hashing import sha256_file
from lastkd.models.checkpoint_io import save_official
from lastkd.models.videomae import create_videomae
from lastkd.teacher.decoders import _ping
from lastkd.teacher.embedder import Embedder
from lastkd.teacher.engine_config import EngineConfig, EngineError
from lastkd.teacher.failures import ClipFailure
from lastkd.teacher.video import PreprocessConfig, VideoLimits, load_clip
from tests.support import media
from tests.support.paths import NTU_SAMPLE_VIDEO

TINY = "videomae_v2_tiny"


def _config(**kw) -> EngineConfig:
    return EngineConfig(
        **{
            "model_name": TINY,
            "random_init": True,
            "device": "cpu",
            "decode_workers": 1,
            "batch_size": 4,
            "max_wait_ms": 50,
            **kw,
        }
    )


def _direct_features(path: Path, cfg: PreprocessConfig, weights: Path | None = None) -> np.ndarray:
    """The feature computed the obvious way, without the engine: one model, load_clip, forward."""
    torch.manual_seed(0)  # the engine documents seed 0 for random-init teachers
    model = create_videomae(TINY, num_frames=cfg.num_frames, img_size=cfg.size, num_classes=0).eval()
    if weights is not None:
        from lastkd.models.checkpoint_io import load_checkpoint

        load_checkpoint(model, weights)
    with torch.inference_mode():
        return model.embed(load_clip(path, cfg, VideoLimits())).numpy()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipeline_clips")
    for i in range(3):
        media.make_clip(d / f"clip{i}.mp4", frames=12 + 3 * i, size=(128 + 16 * i, 96))
    media.make_random_bytes(d / "junk.mp4")
    return d


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    store = FeatureStore(tmp_path_factory.mktemp("pipeline_store") / "f.lmdb", map_size=64 << 20)
    with Embedder(_config(), PreprocessConfig(), VideoLimits(), store) as emb:
        emb.warm_up()
        yield emb
    store.close()


def test_engine_matches_direct_computation_and_batches(engine: Embedder, clip_dir: Path) -> None:
    paths = [clip_dir / f"clip{i}.mp4" for i in range(3)]
    futures = [engine.submit(p, f"direct-{i}") for i, p in enumerate(paths)]
    results = [f.result(timeout=120) for f in futures]
    assert [r.cached for r in results] == [False] * 3
    assert [r.frames_used for r in results] == [12, 15, 16]  # 16 sampled of 18; shorter clips repeat
    arr, found = engine.store.get_many(engine.set_id, [f"direct-{i}" for i in range(3)])
    assert found.all()
    for i, path in enumerate(paths):
        expected = _direct_features(path, PreprocessConfig())[0]
        np.testing.assert_allclose(arr[i], expected, rtol=1e-4, atol=1e-4)
    assert engine.counters.batches < engine.counters.computed + 1  # several clips shared a batch


def test_feature_set_is_labelled_random_init(engine: Embedder) -> None:
    meta = engine.meta()
    assert meta.weights_sha256 == "random-init"
    assert "-random-init-" in engine.set_id and engine.set_id.startswith(TINY)
    assert meta.dim == 96 and meta.dtype == "float32"
    assert meta.preprocessing["sampling"] == "uniform" and meta.preprocessing["model_num_frames"] == 16


def test_bad_clip_fails_alone_and_writes_nothing(engine: Embedder, clip_dir: Path) -> None:
    count = engine.store.count(engine.set_id)
    with pytest.raises(ClipFailure) as info:
        engine.submit(clip_dir / "junk.mp4", "junk").result(timeout=60)
    assert info.value.reason == "not_media"
    with pytest.raises(ClipFailure) as missing:
        engine.submit(clip_dir / "does-not-exist.mp4", "missing").result(timeout=60)
    assert missing.value.message
    assert engine.store.count(engine.set_id) == count
    assert not engine.store.contains(engine.set_id, "junk")


def test_same_bytes_new_id_is_copied_and_conflicts_refused(engine: Embedder, clip_dir: Path) -> None:
    path = clip_dir / "clip0.mp4"
    sha = sha256_file(path)
    first = engine.submit(path, "twin-a", sha).result(timeout=60)
    computed = engine.counters.computed
    second = engine.submit(path, "twin-b", sha).result(timeout=60)
    assert second.cached is True and engine.counters.computed == computed
    # frames_used is stored with the vector: the copy and a repeat answer it too (clip0 has 12)
    assert first.frames_used == second.frames_used == 12
    assert engine.store.clip_info(engine.set_id, "twin-b") == {"frames_used": 12}
    assert engine.submit(path, "twin-a", sha).result(timeout=60).frames_used == 12
    arr, found = engine.store.get_many(engine.set_id, ["twin-a", "twin-b"])
    assert found.all() and np.array_equal(arr[0], arr[1])
    assert first.sha256 == second.sha256 == sha
    other = clip_dir / "clip1.mp4"
    with pytest.raises(ClipFailure) as info:
        engine.submit(other, "twin-a", sha256_file(other)).result(timeout=60)
    assert info.value.reason == "clip_id_conflict"


def test_decoder_crash_is_survived(engine: Embedder, clip_dir: Path) -> None:
    pool = engine._current_pool()
    pid = pool.submit(_ping).result(timeout=60)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    result = None
    while time.monotonic() < deadline:  # the first clip may land on the dead pool
        try:
            result = engine.submit(clip_dir / "clip2.mp4", "after-crash").result(timeout=60)
            break
        except ClipFailure as exc:
            assert exc.reason == "decode_crashed"
    assert result is not None and engine.store.contains(engine.set_id, "after-crash")
    assert engine._current_pool() is not pool  # the broken pool was replaced


def test_multiview_features_are_view_averages(tmp_path: Path) -> None:
    cfg = PreprocessConfig(sampling="multiview", num_frames=4, stride=2, temporal_views=2, spatial_crops=2, size=64)
    clip = media.make_clip(tmp_path / "mv.mp4", frames=20, size=(128, 96))
    store = FeatureStore(tmp_path / "mv.lmdb", map_size=64 << 20)
    with store, Embedder(_config(), cfg, VideoLimits(), store) as emb:
        emb.submit(clip, "mv").result(timeout=120)
        stored = emb.store.get(emb.set_id, "mv")
        assert emb.set_id != "" and emb.meta().preprocessing["temporal_views"] == 2
    views = _direct_features(clip, cfg)
    assert views.shape == (4, 96)
    np.testing.assert_allclose(stored, views.mean(axis=0), rtol=1e-4, atol=1e-4)


def test_weights_are_recorded_in_the_feature_set(tmp_path: Path) -> None:
    torch.manual_seed(123)
    source = create_videomae(TINY, num_classes=0)
    weights = tmp_path / "tiny.pth"
    sha = save_official(source, weights)
    store = FeatureStore(tmp_path / "w.lmdb", map_size=64 << 20)
    clip = NTU_SAMPLE_VIDEO
    with store, Embedder(_config(random_init=False, weights=weights), PreprocessConfig(), VideoLimits(), store) as emb:
        emb.submit(clip).result(timeout=120)
        assert emb.meta().weights_sha256 == sha
        assert sha[:12] in emb.set_id and "random-init" not in emb.set_id
        stored = emb.store.get(emb.set_id, "S001C001P001R001A001")
    np.testing.assert_allclose(stored, _direct_features(clip, PreprocessConfig(), weights)[0], rtol=1e-4, atol=1e-4)


def test_start_up_errors_are_clear(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "e.lmdb", map_size=64 << 20)
    with pytest.raises(EngineError, match="LASTKD_TEACHER_WEIGHTS"):
        Embedder(_config(random_init=False), PreprocessConfig(), VideoLimits(), store)
    with pytest.raises(EngineError, match="not found"):
        Embedder(
            _config(random_init=False, weights=tmp_path / "nope.pth"), PreprocessConfig(), VideoLimits(), store
        ).start()
    with pytest.raises(EngineError, match="unknown VideoMAE V2 model"):
        Embedder(_config(model_name="resnet50"), PreprocessConfig(), VideoLimits(), store).start()
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EngineError, match="cannot load teacher weights"):
        Embedder(_config(random_init=False, weights=bad), PreprocessConfig(), VideoLimits(), store).start()
    assert store.list_sets() == []  # nothing created by a teacher that did not start
    store.close()


def test_model_yields_a_core_to_each_running_decoder(engine: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, before every block the model takes the cores the decoders leave free, and the
    process-wide thread setting is restored after the batch."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(engine, "_cpu_threads", 2)  # as if started on a 2-core machine
    monkeypatch.setattr(engine, "_threads_now", 2)
    torch.set_num_threads(2)
    seen: list[int] = []
    hooks = [
        blk.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads())) for blk in engine.model.blocks
    ]
    frames = np.zeros((1, 16, 224, 224, 3), np.uint8)
    try:
        assert len(engine._hooks) == len(engine.model.blocks)  # installed at start on CPU
        monkeypatch.setattr(engine, "_decoding", 1)
        engine._forward([frames])
        assert seen == [1] * len(engine.model.blocks)  # one decoder busy: one core for the model
        assert torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(engine, "_decoding", 0)
        engine._forward([frames])
        assert seen == [2] * len(engine.model.blocks)
    finally:
        for hook in hooks:
            hook.remove()
        torch.set_num_threads(threads)


def test_preprocessing_comes_from_settings_with_cli_overrides(tmp_path: Path) -> None:
    from lastkd.services.settings import load_settings
    from lastkd.teacher.engine_config import preprocess_from_settings

    default = preprocess_from_settings(load_settings(data_dir=tmp_path))
    assert (default.sampling, default.protocol) == ("uniform", "imagenet")
    official = load_settings(data_dir=tmp_path, teacher_sampling="multiview", teacher_protocol="official_extraction")
    cfg = preprocess_from_settings(official)
    # The squash leaves nothing to crop: one spatial view per temporal window.
    assert (cfg.sampling, cfg.protocol, cfg.spatial_crops, cfg.num_views) == ("multiview", "official_extraction", 1, 5)
    flags = preprocess_from_settings(official, sampling="uniform", protocol="imagenet")
    assert flags == PreprocessConfig()


def test_min_clip_frames_setting_reaches_the_limits(tmp_path: Path) -> None:
    from lastkd.services.settings import load_settings
    from lastkd.teacher.engine_config import limits_from_settings

    assert limits_from_settings(load_settings(data_dir=tmp_path)).min_frames == 1  # today's behaviour
    assert limits_from_settings(load_settings(data_dir=tmp_path, min_clip_frames=8)).min_frames == 8


@pytest.mark.faults
def test_person_crop_embeds_the_box_and_names_its_own_feature_set(tmp_path: Path) -> None:
    """With the person crop the vectors are the model's on the skeleton box of each clip (the NTU
    sample here), the set id differs from the uncropped set's, and a clip without a skeleton file
    fails with ``no_skeleton`` instead of being embedded whole."""
    from lastkd.ntu.skeleton import color_boxes, person_box
    from lastkd.teacher.video import decode_clip, normalize
    from tests.support.paths import NTU_SAMPLE_SKELETON

    cfg = PreprocessConfig(num_frames=8, size=64, person_crop=True)
    assert (
        cfg.as_dict()["spatial"] == "person_box" and PreprocessConfig(num_frames=8, size=64).as_dict() != cfg.as_dict()
    )
    assert PreprocessConfig(sampling="multiview", person_crop=True).num_views == 5  # the square box: one crop
    store = FeatureStore(tmp_path / "f.lmdb", map_size=64 << 20)
    plain_store = FeatureStore(tmp_path / "g.lmdb", map_size=64 << 20)
    stray = tmp_path / "S001C001P001R001A002_rgb.avi"  # an NTU name whose skeleton does not exist
    stray.write_bytes(NTU_SAMPLE_VIDEO.read_bytes())
    try:
        with (
            Embedder(_config(skeletons=NTU_SAMPLE_SKELETON.parent), cfg, VideoLimits(), store) as emb,
            Embedder(_config(), PreprocessConfig(num_frames=8, size=64), VideoLimits(), plain_store) as plain,
        ):
            got = emb.submit(NTU_SAMPLE_VIDEO).result(timeout=300)
            assert got.clip_id == "S001C001P001R001A001" and emb.set_id != plain.set_id
            with pytest.raises(ClipFailure) as failed:
                emb.submit(stray).result(timeout=300)
            assert failed.value.reason == "no_skeleton" and "S001C001P001R001A002.skeleton" in failed.value.message
            vector = store.get_many(emb.set_id, [got.clip_id])[0][0]
        box = person_box(color_boxes(NTU_SAMPLE_SKELETON), cfg.crop_pad)
        torch.manual_seed(0)
        model = create_videomae(TINY, num_frames=8, img_size=64, num_classes=0).eval()
        with torch.inference_mode():
            views = decode_clip(NTU_SAMPLE_VIDEO, cfg, VideoLimits(), box=box).views
            direct = model.embed(normalize(views, cfg)).numpy()[0]
        np.testing.assert_allclose(vector, direct, rtol=1e-4, atol=1e-5)
    finally:
        store.close()
        plain_store.close()
    with pytest.raises(EngineError, match="LASTKD_TEACHER_SKELETONS"):
        Embedder(_config(), cfg, VideoLimits(), FeatureStore(tmp_path / "h.lmdb", map_size=64 << 20)).start()


def test_nvdec_is_used_or_refused_with_the_reason_never_silently_replaced(tmp_path: Path) -> None:
    """``LASTKD_TEACHER_DECODE=nvdec`` on a host without usable NVDEC (this CPU machine) stops the
    engine at start with the reason; where NVDEC works, the engine starts with it (the frames'
    equality with software decoding is checked by bench/gpu_smoke.sh on a GPU)."""
    from lastkd.teacher.video import check_decoder

    assert check_decoder("cpu") is None
    problem = check_decoder("nvdec")
    store = FeatureStore(tmp_path / "f.lmdb", map_size=64 << 20)
    engine = Embedder(_config(decoder="nvdec"), PreprocessConfig(num_frames=8, size=64), VideoLimits(), store)
    try:
        if problem is None:
            engine.start()
            assert engine.submit(NTU_SAMPLE_VIDEO).result(timeout=300).clip_id == "S001C001P001R001A001"
        else:
            with pytest.raises(EngineError, match="LASTKD_TEACHER_DECODE=nvdec: .*(NVDEC|CUDA)"):
                engine.start()
            assert engine._decoders is None  # nothing was started
    finally:
        engine.close()
        store.close()
