"""The training engine on a tiny synthetic NTU-format dataset (real .skeleton files, real LMDB store).

Kept tiny on purpose (6 training clips, 8 frames, batch 2, 2 steps per epoch): the point is the
mechanics (resume, determinism, distillation wiring, errors), not accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lastkd.student import training as engine
from lastkd.student.config import ConfigError, TrainConfig
from lastkd.student.synth import generate


def make_dataset(root: Path) -> Path:
    """A synthetic NTU-format dataset: 3 classes x 4 clips, split xsub 6 train / 6 val."""
    out = root / "synth"
    generate(out, classes=3, samples_per_class=4, frames=40, video=False, seed=0)
    return out / "skeletons"


def tiny_config(data_path: Path, **overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"path": str(data_path), "num_frames": 8, "split": "xsub"},
        "epochs": 2,
        "batch_size": 2,
        "max_steps_per_epoch": 2,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        "device": "cpu",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return TrainConfig.from_dict(raw)


def make_store(root: Path, names: list[str], dim: int = 16, seed: int = 0) -> tuple[Path, str]:
    """A real LMDB feature store with a random-init feature set covering ``names``."""
    from lastkd.featurestore import FeatureStore

    path = root / "features.lmdb"
    store = FeatureStore(path, map_size=64 << 20)
    meta = store.create_set(
        teacher="videomae_v2_vit_b", weights_sha256=None, preprocessing={"test": seed}, dim=dim, dtype="float16"
    )
    vecs = np.random.default_rng(seed).normal(size=(len(names), dim)).astype(np.float16)
    store.put_many(meta.set_id, names, vecs)
    store.close()
    return path, meta.set_id


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_run(data_path, tmp_path_factory) -> tuple[engine.TrainResult, list[engine.Progress]]:
    """An uninterrupted 2-epoch run (workers=0), with one level of each corruption evaluated."""
    torch.set_num_threads(1)
    seen: list[engine.Progress] = []
    cfg = tiny_config(data_path, eval={"jitter_stds": [0.05], "joint_drop_probs": [0.2], "frame_drop_probs": [0.2]})
    result = engine.train(cfg, tmp_path_factory.mktemp("ref") / "run", hooks=engine.TrainHooks(on_progress=seen.append))
    return result, seen


def test_uninterrupted_run(reference_run) -> None:
    result, seen = reference_run
    assert result.state is engine.RunState.COMPLETED
    assert result.epochs_completed == 2 and len(result.history) == 2
    assert result.data_info.train_size == 6 and result.data_info.val_size == 6
    train_steps = [(p.epoch, p.step) for p in seen if p.phase == "train"]
    assert train_steps == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert [p.phase for p in seen if p.phase != "train"] == ["eval", "eval", "final_eval", "done"]
    first = seen[0]
    assert first.steps_per_epoch == 2 and first.epochs == 2 and first.samples_per_s > 0 and first.eta_s > 0
    assert set(first.losses) >= {"ce", "distill", "total"} and first.alpha == 0.0
    assert seen[-1].val is not None
    assert all(np.isfinite(h["train_total"]) for h in result.history)
    # the weights changed from the seed-0 initialisation
    torch.manual_seed(0)
    init = engine.create_last_v2("small", 60).state_dict()
    assert not torch.equal(init["fc.weight"], result.model_state["fc.weight"])
    # final metrics: per-class, confusion, robustness
    m = result.metrics
    assert len(m["per_class"]) == 60 and np.asarray(m["confusion"]).sum() == 6
    assert set(m["robustness"]) == {"jitter@0.05", "joint_drop@0.2", "frame_drop@0.2"}
    # the last epoch's val top-1 is the clean top-1 of the final evaluation
    assert result.history[-1]["val_top1"] == pytest.approx(m["top1"])
    ck = engine.load_checkpoint_file(result.run_dir / engine.CHECKPOINT_NAME)
    assert ck["epoch"] == 2 and ck["projector"] is None and ck["config_hash"] == result.config.config_hash()
    assert not any(k.startswith("projector") for k in result.model_state)


@pytest.mark.parametrize("workers", [0, 2])
def test_cancel_then_resume_is_bit_identical(reference_run, data_path, tmp_path, workers) -> None:
    ref, _ = reference_run
    cfg = tiny_config(
        data_path, workers=workers, eval={"jitter_stds": [0.05], "joint_drop_probs": [0.2], "frame_drop_probs": [0.2]}
    )
    assert cfg.config_hash() == ref.config.config_hash()  # the worker count is not part of the run's identity
    run_dir = tmp_path / "run"
    flag = {"cancel": False}

    def on_progress(p: engine.Progress) -> None:
        if p.phase == "eval" and p.epoch == 0:
            flag["cancel"] = True

    hooks = engine.TrainHooks(on_progress=on_progress, should_cancel=lambda: flag["cancel"])
    partial = engine.train(cfg, run_dir, hooks=hooks)
    assert partial.state is engine.RunState.CANCELLED and partial.epochs_completed == 1
    assert engine.load_checkpoint_file(run_dir / "last.pt")["epoch"] == 1
    assert not (run_dir / "result.pt").exists()

    resumed = engine.train(cfg, run_dir)
    assert resumed.state is engine.RunState.COMPLETED
    assert weights_equal(resumed.model_state, ref.model_state)
    assert [h["train_total"] for h in resumed.history] == [h["train_total"] for h in ref.history]
    assert resumed.metrics["robustness"] == ref.metrics["robustness"]


def test_finished_run_is_returned_not_retrained(reference_run) -> None:
    ref, _ = reference_run
    calls = []
    again = engine.train(ref.config, ref.run_dir, hooks=engine.TrainHooks(on_progress=calls.append))
    assert calls == [] and again.state is engine.RunState.COMPLETED
    assert weights_equal(again.model_state, ref.model_state)
    assert again.metrics["top1"] == ref.metrics["top1"]


def test_resume_refuses_other_config(reference_run, data_path, tmp_path) -> None:
    ref, _ = reference_run
    other = tiny_config(data_path, seed=1)
    with pytest.raises(engine.ResumeError, match="different training config"):
        engine.train(other, ref.run_dir)
    # same refusal from a bare last.pt (no result.pt yet)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes((ref.run_dir / "last.pt").read_bytes())
    with pytest.raises(engine.ResumeError, match="different training config"):
        engine.train(other, run_dir)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_is_a_clear_error(data_path, tmp_path, content) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(content)
    with pytest.raises(engine.ResumeError, match="unreadable checkpoint"):
        engine.train(tiny_config(data_path), run_dir)
    assert (run_dir / "last.pt").read_bytes() == content  # nothing overwritten


def test_truncated_real_checkpoint(reference_run, data_path, tmp_path) -> None:
    ref, _ = reference_run
    blob = (ref.run_dir / "last.pt").read_bytes()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(engine.ResumeError, match="unreadable checkpoint"):
        engine.train(ref.config, run_dir)


def test_distillation_uses_projector_and_reports_coverage(data_path, tmp_path) -> None:
    from lastkd.student.data.config import DataConfig
    from lastkd.student.data.sources import load_splits

    torch.set_num_threads(1)
    train_col, val_col = load_splits(DataConfig(path=data_path, num_frames=8))
    names = train_col.names[:4] + val_col.names[:3]  # 4/6 train and 3/6 val clips have a teacher vector
    store, set_id = make_store(tmp_path, names)
    cfg = tiny_config(
        data_path,
        epochs=1,
        distill={
            "feature_set": set_id,
            "alpha_start": 0.5,
            "alpha_end": 0.0,
            "schedule": "linear",
            "loss": "mse",
            "teacher_norm": "standardize",
            "projector_hidden": 8,
        },
    )
    seen: list[engine.Progress] = []
    result = engine.train(cfg, tmp_path / "run", store_path=store, hooks=engine.TrainHooks(on_progress=seen.append))
    alphas = [p.alpha for p in seen if p.phase == "train"]
    assert alphas == pytest.approx([0.5, 0.25])  # linear decay over the 2 steps (progress 0, 1/2)
    distill = [p.losses["distill"] for p in seen if p.phase == "train"]
    assert all(d > 0 for d in distill)
    assert result.data_info.coverage_train == pytest.approx(4 / 6)
    assert result.metrics["coverage_val"] == pytest.approx(3 / 6)
    assert result.data_info.feature_dim == 16
    ck = engine.load_checkpoint_file(tmp_path / "run" / "last.pt")
    assert ck["projector"] is not None and ck["projector"]["net.0.weight"].shape == (8, 256)
    assert not any("projector" in k or k.startswith("net.") for k in result.model_state)
    assert set(result.model_state) == set(engine.create_last_v2("small", 60).state_dict())


def test_distillation_errors(data_path, tmp_path) -> None:
    cfg = tiny_config(data_path, distill={"feature_set": "videomae_v2_vit_b-random-init-000000000000"})
    with pytest.raises(engine.TrainError, match="needs a feature store"):
        engine.train(cfg, tmp_path / "a")
    store, set_id = make_store(tmp_path, ["S017C003P040R002A060"])  # not among the synthetic clips
    with pytest.raises(ValueError, match="is not in the store"):
        engine.train(cfg, tmp_path / "b", store_path=store)
    cfg2 = tiny_config(data_path, distill={"feature_set": set_id})
    with pytest.raises(engine.TrainError, match="covers none"):
        engine.train(cfg2, tmp_path / "c", store_path=store)
    assert not (tmp_path / "c" / "last.pt").exists()


def test_run_errors(data_path, tmp_path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(engine.TrainError, match="CUDA is not available"):
            engine.train(tiny_config(data_path, device="cuda"), tmp_path / "a")
    with pytest.raises(engine.TrainError, match="fewer than batch_size 8"):
        engine.train(tiny_config(data_path, batch_size=8), tmp_path / "b")
    with pytest.raises(ValueError, match="missing: not a folder"):
        engine.train(tiny_config(tmp_path / "missing"), tmp_path / "c")
    assert not (tmp_path / "b" / "last.pt").exists()


def test_lr_schedule() -> None:
    cfg = TrainConfig.from_dict(
        {
            "name": "x",
            "data": {"path": "d"},
            "epochs": 10,
            "optimizer": {"lr": 0.1},
            "schedule": {"kind": "cosine", "warmup_epochs": 2, "min_lr": 0.01},
        }
    )
    f = engine.lr_factor_fn(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.05) and f(9) == pytest.approx(0.5)  # linear warmup over 20 steps
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(99) == pytest.approx(0.1, abs=2e-3)
    step = TrainConfig.from_dict(
        {
            "name": "x",
            "data": {"path": "d"},
            "epochs": 10,
            "schedule": {"kind": "step", "milestones": [3, 6], "gamma": 0.5},
        }
    )
    g = engine.lr_factor_fn(step, steps_per_epoch=4)
    assert [g(0), g(11), g(12), g(24)] == [1.0, 1.0, 0.5, 0.25]


def test_global_batch_sampler_shards_the_same_batches() -> None:
    single = list(engine.GlobalBatchSampler(10, 4, seed=3))
    assert len(single) == 8 and len(set(single)) == 8  # 2 full global batches, trailing 2 dropped
    ranks = [list(engine.GlobalBatchSampler(10, 4, seed=3, rank=r, world=2)) for r in range(2)]
    for b in range(2):
        union = ranks[0][2 * b : 2 * b + 2] + ranks[1][2 * b : 2 * b + 2]
        assert union == single[4 * b : 4 * b + 4]
    s = engine.GlobalBatchSampler(10, 4, seed=3)
    s.set_epoch(1)
    assert list(s) != single
    with pytest.raises(engine.TrainError, match="not divisible"):
        engine.GlobalBatchSampler(10, 3, seed=0, world=2)


# --------------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------------
def test_config_from_yaml_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        TrainConfig.from_yaml(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(p)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        TrainConfig.from_yaml(p)
    p.write_text(
        "name: ../../etc\nepochs: 0\nbatch_size: 1e9\ndata: {path: x, nonsense: 1}\n"
        "optimizer: {name: adam, lr: -1}\namp: fp16\ndevice: cpu\ndistill: {alpha_start: 2}\n"
    )
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_yaml(p)
    msg = str(exc.value)
    for field in (
        "name:",
        "epochs:",
        "batch_size:",
        "data.nonsense:",
        "optimizer.name:",
        "optimizer.lr:",
        "distill.alpha_start:",
    ):
        assert field in msg, field
    p.write_text("name: ok\nepochs: 2\ndata: {path: x}\namp: fp16\ndevice: cpu\n")
    with pytest.raises(ConfigError, match="amp needs CUDA"):
        TrainConfig.from_yaml(p)
    p.write_text("name: ok\nepochs: 2\ndata: {path: x}\nschedule: {warmup_epochs: 3}\n")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig.from_yaml(p)
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError, match="bytes"):
        TrainConfig.from_yaml(big)


def test_config_roundtrip_and_paths(tmp_path) -> None:
    cfg = TrainConfig.from_dict(
        {"name": "a.b-c_1", "data": {"path": "ds/raw", "missing_skeletons": "/abs/m.txt"}, "epochs": 3}
    )
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(p) == cfg
    assert cfg.label_smoothing == 0.1
    assert cfg.path_fields() == {"data.path": Path("ds/raw"), "data.missing_skeletons": Path("/abs/m.txt")}
    # the hash ignores loader width/device/eval, not the seed
    assert cfg.model_copy(update={"workers": 4, "device": "cpu"}).config_hash() == cfg.config_hash()
    assert cfg.model_copy(update={"seed": 1}).config_hash() != cfg.config_hash()


def test_losses_synced_every_few_steps_give_the_same_history(data_path, tmp_path) -> None:
    """On a GPU the loop keeps the losses on the device and syncs every SYNC_EVERY_STEPS steps;
    the same path on the CPU (forced here) reports each window's mean at its last step, and the
    epoch's history is the one of a per-step sync."""
    torch.set_num_threads(1)
    cfg = tiny_config(data_path, epochs=1, max_steps_per_epoch=3, batch_size=2)  # 3 steps (6 samples)
    results = {}
    for every in (1, 2):
        seen: list[engine.Progress] = []
        run = engine.TrainingRun(cfg, tmp_path / f"run{every}", None, engine.TrainHooks(on_progress=seen.append), None)
        run.build()
        run.sync_every = every
        assert run.run_epoch(0)
        steps = [p.step for p in seen if p.phase == "train"]
        results[every] = (steps, run.history[0], [p.losses["total"] for p in seen if p.phase == "train"])
    assert results[1][0] == [1, 2, 3] and results[2][0] == [2, 3]  # a window also ends at the epoch end
    for key in ("train_total", "train_ce", "train_grad_norm"):
        assert results[2][1][key] == pytest.approx(results[1][1][key], rel=1e-12)
    per_step = results[1][2]
    assert results[2][2] == pytest.approx([(per_step[0] + per_step[1]) / 2, per_step[2]])


def test_val_split_scored_every_n_epochs_and_after_the_last(data_path, tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(data_path, epochs=3, max_steps_per_epoch=1, eval={"every_epochs": 2})
    seen: list[engine.Progress] = []
    result = engine.train(cfg, tmp_path / "run", hooks=engine.TrainHooks(on_progress=seen.append))
    assert ["val_top1" in h for h in result.history] == [False, True, True]
    assert [p.val is not None for p in seen if p.phase == "eval"] == [False, True, True]
    assert result.history[-1]["val_top1"] == pytest.approx(result.metrics["top1"])
    with pytest.raises(ConfigError, match="every_epochs"):
        tiny_config(data_path, eval={"every_epochs": 0})
