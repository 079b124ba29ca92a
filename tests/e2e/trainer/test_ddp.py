"""DDP through ``lastkd train --ddp 2`` (torchrun, gloo on CPU) against a single-process run.

Why a tolerance and not equality: ``batch_size`` is the global batch and each rank trains on its
half of exactly the global batch the single process draws (same samples, same augmentation, DDP
averages the gradients), but BatchNorm normalises each rank's half with that half's statistics
(no SyncBatchNorm on CPU), so gradients differ slightly; float reductions differ too. Measured on
this config: relative distance of the final weights 0.31 of the distance travelled from the
initial weights, cosine of the two weight updates 0.95, epoch loss within 1.5%. A DDP whose
ranks did not average gradients, or trained on other samples, moves elsewhere.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from lastkd.models.last_v2 import create_last_v2
from lastkd.services import cli
from lastkd.student import training as engine
from lastkd.student.config import TrainConfig
from lastkd.student.paths import confine_config_paths
from lastkd.student.publish import list_published, load_student
from lastkd.student.synth import generate


@pytest.mark.slow
def test_ddp_two_processes_matches_single_process(tmp_path, monkeypatch, capsys) -> None:
    torch.set_num_threads(1)
    roots = tmp_path / "datasets"
    generate(roots / "synth", classes=3, samples_per_class=8, frames=40, video=False, seed=0)
    raw = {
        "name": "ddp-tiny",
        "data": {"path": "synth/skeletons", "num_frames": 8},  # relative: resolved against the data root
        "epochs": 1,
        "batch_size": 4,
        "max_steps_per_epoch": 3,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "device": "cpu",
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
    }
    config = TrainConfig.from_dict(raw)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(config.to_yaml())

    single = engine.train(confine_config_paths(config, [roots]), tmp_path / "single")

    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", f'["{roots}"]')
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "ddp"
    rc = cli.main(["train", str(cfg_path), "--ddp", "2", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    ddp = engine.load_result(run_dir)

    # rank 0 alone wrote: the files of one run, nothing half-written, RNG states of both ranks
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "last.pt", "result.pt", "tensorboard"]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    ck = engine.load_checkpoint_file(run_dir / "last.pt")
    assert len(ck["rng"]) == 2 and ck["epoch"] == 1
    assert ddp.config.config_hash() == single.config.config_hash()

    torch.manual_seed(0)
    init = create_last_v2("small", 60).state_dict()
    names = [n for n, _ in create_last_v2("small", 60).named_parameters()]
    u_single = torch.cat([(single.model_state[n] - init[n]).flatten() for n in names])
    u_ddp = torch.cat([(ddp.model_state[n] - init[n]).flatten() for n in names])
    rel = float((u_ddp - u_single).norm() / u_single.norm())
    cos = float(F.cosine_similarity(u_single, u_ddp, dim=0))
    assert rel < 0.5, rel
    assert cos > 0.85, cos
    loss_s, loss_d = single.history[0]["train_total"], ddp.history[0]["train_total"]
    assert math.isclose(loss_s, loss_d, rel_tol=0.05), (loss_s, loss_d)
    assert ddp.metrics["num_samples"] == single.metrics["num_samples"] == 12

    # the CLI published the DDP student
    published = list_published(tmp_path / "var" / "registry")
    assert [(p.name, p.version) for p in published] == [("ddp-tiny", 1)]
    assert str(published[0].path) in out
    student = load_student(published[0].path)
    assert all(torch.equal(student.state_dict()[k], ddp.model_state[k]) for k in ddp.model_state)


@pytest.mark.slow
def test_ddp_with_one_stream_trains_and_keeps_the_unused_streams_loadable(tmp_path, monkeypatch, capsys) -> None:
    """Streams the run does not feed used to crash DDP at step 2 ("Expected to have finished
    reduction ..."): their input BatchNorms never get gradients. They are frozen, kept in the
    state dict unchanged, and the published student still loads strictly."""
    torch.set_num_threads(1)
    roots = tmp_path / "datasets"
    generate(roots / "synth", classes=3, samples_per_class=8, frames=40, video=False, seed=0)
    raw = {
        "name": "ddp-joint",
        "data": {"path": "synth/skeletons", "num_frames": 8, "streams": ["joint"]},
        "epochs": 2,
        "batch_size": 4,
        "max_steps_per_epoch": 2,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "device": "cpu",
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(TrainConfig.from_dict(raw).to_yaml())
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", f'["{roots}"]')
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = cli.main(["train", str(cfg_path), "--ddp", "2", "--run-dir", str(tmp_path / "ddp")])
    out = capsys.readouterr().out
    assert rc == 0, out
    ddp = engine.load_result(tmp_path / "ddp")
    assert len(ddp.history) == 2  # four optimizer steps on two ranks
    torch.manual_seed(0)
    init = create_last_v2("small", 60).state_dict()
    for i in (1, 2):  # velocity and bone: untouched
        for leaf in ("weight", "bias"):
            assert torch.equal(ddp.model_state[f"data_bn.{i}.{leaf}"], init[f"data_bn.{i}.{leaf}"])
    assert not torch.equal(ddp.model_state["data_bn.0.weight"], init["data_bn.0.weight"])  # joint trained
    (published,) = list_published(tmp_path / "var" / "registry")
    load_student(published.path)  # strict


def _grads_rank(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    from lastkd.student.ddp import allreduce_mean_grads

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
        allreduce_mean_grads(params, world)  # no rank has a gradient: they stay None
        none_everywhere = all(p.grad is None for p in params)
        if rank == 0:  # one rank has a gradient: every rank gets the mean (zeros elsewhere)
            params[0].grad = torch.full((3,), 4.0)
        allreduce_mean_grads(params, world)
        results[rank] = (none_everywhere, params[0].grad.tolist(), params[1].grad.tolist())
    finally:
        dist.destroy_process_group()


def test_gradients_no_rank_computed_stay_none_across_ranks(tmp_path) -> None:
    """Under DDP the projector's gradients are averaged by hand; on a step where no rank computed
    one (distillation weight 0) they must stay None, so momentum and weight decay leave it alone."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_grads_rank, args=(2, str(tmp_path / "pg"), results), nprocs=2, join=True)
        got = dict(results)
    assert got[0] == got[1] == (True, [2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
