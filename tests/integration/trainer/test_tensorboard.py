"""Every training run writes TensorBoard event files under its run folder, and their scalars are
the numbers of the run's published ``metrics.json`` history (read back with tensorboard's own
EventAccumulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lastkd.student import tblog
from lastkd.student import training as engine
from lastkd.student.config import TrainConfig
from lastkd.student.publish import publish
from lastkd.student.synth import generate

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# history keys that must reach TensorBoard (the numbers people read first)
REQUIRED = {"train_ce", "train_distill", "train_total", "train_grad_norm", "alpha_end", "lr", "val_top1", "val_top5"}


def test_event_files_hold_the_metrics_json_history(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = generate(tmp_path / "synth", classes=3, samples_per_class=4, frames=40, video=False, seed=0)
    cfg = TrainConfig.from_dict(
        {
            "name": "tb",
            "data": {"path": str(data.skeleton_dir), "num_frames": 8, "streams": ["joint"]},
            "epochs": 2,
            "batch_size": 2,
            "max_steps_per_epoch": 2,
            "device": "cpu",
            "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        }
    )
    run_dir = tmp_path / "run"
    result = engine.train(cfg, run_dir)
    published = publish(result, tmp_path / "registry", job_id="tb-test")
    history = json.loads((published.path / "metrics.json").read_text())["history"]
    assert len(history) == 2 and REQUIRED <= set(history[0])

    logs = tblog.log_dir(run_dir)
    assert logs.is_dir() and any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())
    acc = EventAccumulator(str(logs))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"epoch/{k}" for k in REQUIRED} <= tags
    for key in REQUIRED:
        events = acc.Scalars(f"epoch/{key}")
        assert [e.step for e in events] == [1, 2]
        # event files store float32: equal to the history up to float32 rounding
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6, abs=1e-7)
    # per step: one point per optimiser step for each loss part, alpha, lr and the gradient norm
    for key in ("ce", "total", "grad_norm", "alpha", "lr"):
        assert [e.step for e in acc.Scalars(f"step/{key}")] == [1, 2, 3, 4]
    steps = acc.Scalars("step/total")
    assert (steps[0].value + steps[1].value) / 2 == pytest.approx(history[0]["train_total"], rel=1e-5)
    assert all(e.value > 0 for e in acc.Scalars("step/grad_norm"))


@pytest.mark.faults
def test_a_run_that_fails_before_its_first_step_leaves_no_log_folder(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(
        {
            "name": "tb",
            "data": {"path": str(tmp_path / "nowhere"), "num_frames": 8},
            "epochs": 1,
            "device": "cpu",
        }
    )
    with pytest.raises((engine.TrainError, ValueError, OSError)):
        engine.train(cfg, tmp_path / "run")
    assert not tblog.log_dir(tmp_path / "run").exists()
