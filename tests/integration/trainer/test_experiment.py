"""Experiments through the real engine on a synthetic set with a class-informative teacher (real
LMDB feature store): the shuffled control, paired seeding across arms, the local runner whose
report is recomputed here from the children's own result files, and ``lastkd compare``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lastkd.services import cli
from lastkd.student import training as engine
from lastkd.student.config import TrainConfig
from lastkd.student.data.dataset import TeacherFeatures
from lastkd.student.experiment import ExperimentConfig, expand, run_local
from tests.support.experiment import InformativeData, experiment_base, make_informative_data

T95 = {1: 12.706, 2: 4.303}  # two-sided 95% Student-t critical values (tables)
ROBUST = {"jitter_stds": [0.05], "joint_drop_probs": [0.2], "frame_drop_probs": [0.2]}


@pytest.fixture(scope="module")
def informative(tmp_path_factory: pytest.TempPathFactory) -> InformativeData:
    return make_informative_data(tmp_path_factory.mktemp("informative"))


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# the shuffled control
# --------------------------------------------------------------------------------------------
def test_shuffle_is_a_seeded_permutation_of_the_covered_vectors() -> None:
    names = [f"c{i}" for i in range(8)]
    vecs = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    found = np.array([True] * 6 + [False] * 2)
    t = TeacherFeatures(names, vecs, found, "fs")
    a, b, c = t.shuffled(1), t.shuffled(1), t.shuffled(2)
    assert np.array_equal(a.vectors, b.vectors) and not np.array_equal(a.vectors, c.vectors)
    assert not np.array_equal(a.vectors, t.vectors)
    # the same multiset of vectors on the covered clips; uncovered clips still have none
    assert sorted(map(tuple, a.vectors[:6])) == sorted(map(tuple, t.vectors[:6]))
    assert np.array_equal(a.found, found) and not a.vectors[6:].any()


def test_shuffled_teacher_ends_with_a_clearly_higher_distillation_loss(
    informative: InformativeData, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    final = {}
    for order in ("joined", "shuffled"):
        # scored once at the end: validation draws no training randomness, so the curve is the same
        raw = experiment_base(informative, distill={"teacher_order": order}, eval={"every_epochs": 16})
        cfg = TrainConfig.from_dict(raw)
        result = engine.train(cfg, tmp_path / order, store_path=informative.store_path)
        final[order] = result.history[-1]["train_distill"]
    # measured 0.878 vs 0.501 (1.75x); 1.3x leaves room for recipe changes, not for a broken join
    assert final["shuffled"] > 1.3 * final["joined"], final


# --------------------------------------------------------------------------------------------
# pairing: the same seed gives every arm the same start, order and augmentation
# --------------------------------------------------------------------------------------------
def tiny_experiment(informative: InformativeData, **extra: Any) -> ExperimentConfig:
    base = experiment_base(
        informative,
        epochs=1,
        batch_size=4,
        max_steps_per_epoch=2,
        data={"max_samples": 8},
        eval=ROBUST,
    )
    return ExperimentConfig.from_dict({"name": "tiny", "base": base, "seeds": [0, 1], **extra})


def test_arms_of_one_seed_start_identically(informative: InformativeData, tmp_path: Path) -> None:
    exp = tiny_experiment(informative)
    built = {}
    for child in expand(exp):
        run = engine.TrainingRun(
            child.config,
            tmp_path / child.key,
            informative.store_path if child.config.distill.enabled else None,
            engine.TrainHooks(),
            None,
        )
        run.build()
        run.train_ds.set_epoch(0)
        run.sampler.set_epoch(0)
        built[(child.arm, child.seed)] = (
            {k: v.clone() for k, v in run.model.state_dict().items()},
            list(iter(run.sampler)),
            run.train_ds[3]["joint"],
        )
    for seed in (0, 1):
        ce = built[("ce", seed)]
        for arm in ("kd", "kd-shuffled"):
            other = built[(arm, seed)]
            assert weights_equal(ce[0], other[0]) and ce[1] == other[1] and torch.equal(ce[2], other[2])
    assert not weights_equal(built[("ce", 0)][0], built[("ce", 1)][0])
    assert built[("ce", 0)][1] != built[("ce", 1)][1]


# --------------------------------------------------------------------------------------------
# the local runner and its report
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(
    informative: InformativeData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExperimentConfig, Path, Any]:
    torch.set_num_threads(1)
    exp = tiny_experiment(informative)
    out = tmp_path_factory.mktemp("exp") / "out"
    return exp, out, run_local(exp, out, store_path=informative.store_path)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    h = T95[n - 1] * sd / math.sqrt(n)
    return m, m - h, m + h


def test_report_equals_recomputation_from_the_children(local_run) -> None:
    exp, out, local = local_run
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Experiment tiny")
    assert {p.name for p in (out / "plots").iterdir()} == {"accuracy.png", "per_class_diff.png", "loss_curves.png"}
    # the children's own result files, read back independently of the runner
    kids = {(a, s): engine.load_result(out / "runs" / f"{a}-s{s}") for a in ("ce", "kd", "kd-shuffled") for s in (0, 1)}
    assert all(r.state is engine.RunState.COMPLETED and r.config.seed == s for (a, s), r in kids.items())
    assert report["seeds"] == [0, 1] and report["missing"] == []

    def close(iv: dict[str, Any], values: list[float]) -> None:
        m, lo, hi = t_interval(values)
        assert iv["mean"] == pytest.approx(m, abs=1e-12)
        assert iv["lo"] == pytest.approx(lo, abs=1e-3) and iv["hi"] == pytest.approx(hi, abs=1e-3)

    for arm in ("ce", "kd", "kd-shuffled"):
        close(report["per_arm"][arm]["top1"], [kids[(arm, s)].metrics["top1"] for s in (0, 1)])
        close(report["per_arm"][arm]["top5"], [kids[(arm, s)].metrics["top5"] for s in (0, 1)])
    for arm in ("kd", "kd-shuffled"):
        close(
            report["paired"][arm]["top1"],
            [kids[(arm, s)].metrics["top1"] - kids[("ce", s)].metrics["top1"] for s in (0, 1)],
        )
        close(
            report["per_arm"][arm]["final_distill_loss"], [kids[(arm, s)].history[-1]["train_distill"] for s in (0, 1)]
        )
        for key in ("jitter@0.05", "joint_drop@0.2", "frame_drop@0.2"):
            close(
                report["paired"][arm]["robustness"][key],
                [
                    kids[(arm, s)].metrics["robustness"][key]["top1"]
                    - kids[("ce", s)].metrics["robustness"][key]["top1"]
                    for s in (0, 1)
                ],
            )
        close(
            report["paired"][arm]["object_top1"],
            [
                kids[(arm, s)].metrics["object_classes"]["top1"] - kids[("ce", s)].metrics["object_classes"]["top1"]
                for s in (0, 1)
            ],
        )
        per_class = {c["index"]: c for c in report["paired"][arm]["per_class"]}
        present = [p["index"] for p in kids[(arm, 0)].metrics["per_class"] if p["accuracy"] is not None]
        assert sorted(per_class) == present and len(present) == 3
        for i in present:
            close(
                per_class[i]["diff"],
                [
                    kids[(arm, s)].metrics["per_class"][i]["accuracy"]
                    - kids[("ce", s)].metrics["per_class"][i]["accuracy"]
                    for s in (0, 1)
                ],
            )
    assert report["per_arm"]["ce"]["final_distill_loss"] is None
    assert sum("within noise" in s or "real difference" in s for s in report["summary"]) >= 4


def test_alpha_zero_arms_train_identical_weights(local_run, informative: InformativeData, tmp_path: Path) -> None:
    """An arm that keeps the feature set but has alpha 0 trains exactly the ce arm (same seed)."""
    exp, out, _ = local_run
    kd = exp.arm_config("kd", 0)
    twin = kd.model_copy(
        update={
            "name": "twin",
            "distill": kd.distill.model_copy(update={"alpha_start": 0.0, "alpha_end": 0.0, "projector_hidden": 7}),
        }
    )
    result = engine.train(twin, tmp_path / "twin", store_path=informative.store_path)
    ce = engine.load_result(out / "runs" / "ce-s0")
    assert weights_equal(result.model_state, ce.model_state)
    assert not weights_equal(engine.load_result(out / "runs" / "ce-s1").model_state, ce.model_state)


def test_rerun_reads_finished_children_back(local_run, informative: InformativeData) -> None:
    exp, out, first = local_run
    again = run_local(exp, out, store_path=informative.store_path)

    def numbers(report: dict[str, Any]) -> dict[str, Any]:  # wall times are the only thing allowed to differ
        return {**report, "children": [{k: v for k, v in c.items() if k != "wall_s"} for c in report["children"]]}

    assert numbers(again.report) == numbers(first.report)
    assert sum(c.wall_s for c in again.children) < 0.5 * sum(c.wall_s for c in first.children)  # nothing retrained


# --------------------------------------------------------------------------------------------
# lastkd compare
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def cli_env(informative: InformativeData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", json.dumps([str(informative.skeletons.parents[1])]))
    monkeypatch.setenv("LASTKD_STORE_PATH", str(informative.store_path))
    return tmp_path


def test_lastkd_compare_prints_paired_differences(informative: InformativeData, cli_env: Path, capsys) -> None:
    torch.set_num_threads(1)
    raw = experiment_base(informative, epochs=1, batch_size=2, max_steps_per_epoch=1, data={"max_samples": 4})
    raw["data"]["path"] = "synth/skeletons"  # relative: resolved against the data root
    cfg = cli_env / "train.yaml"
    cfg.write_text(json.dumps(raw))
    assert cli.main(["compare", str(cfg), "--arms", "kd", "--seeds", "1", "--out", str(cli_env / "cmp")]) == 0
    captured = capsys.readouterr()
    assert "paired differences vs ce" in captured.out and "kd vs ce, top-1:" in captured.out
    assert "1 seed" in captured.out and "kd-shuffled" not in captured.out
    assert "tensorboard logs:" in captured.err and "[2/2] kd-s0" in captured.err
    report = json.loads((cli_env / "cmp" / "report.json").read_text())
    assert report["arms"] == ["ce", "kd"] and report["seeds"] == [0]


@pytest.mark.faults
@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("name: e\nbase: {name: b, epochs: 0, data: {path: synth/skeletons}}\n", [], "base.epochs"),
        (
            "name: e\nbase: {name: b, epochs: 1, data: {path: synth/skeletons}, distill: {feature_set: x}}\n"
            "arms: {ce: {}, kd: {distill: {alpha_start: 3}}}\n",
            [],
            "arms.kd.distill.alpha_start",
        ),
        ("name: b\nepochs: 1\ndata: {path: synth/skeletons}\ndistill: {feature_set: x}\n", ["--seeds", "0"], "--seeds"),
        (
            "name: b\nepochs: 1\ndata: {path: synth/skeletons}\ndistill: {feature_set: x}\n",
            ["--arms", "kd,nope"],
            "nope",
        ),
        ("name: b\nepochs: 1\ndata: {path: /etc}\ndistill: {feature_set: x}\n", [], "base.data.path"),
        (
            "name: e\nbase: {name: b, epochs: 1, data: {path: synth/skeletons}, distill: {feature_set: x}}\n"
            "arms: {ce: {}, kd: {data: {path: /etc}}}\n",
            [],
            "arms.kd.data.path",
        ),
        ("name: b\nepochs: 1\ndata: {path: synth/skeletons}\n", [], "base.distill"),
    ],
)
def test_lastkd_compare_bad_input_exits_2_naming_the_field(
    cli_env: Path, capsys, yaml_text: str, flags: list[str], message: str
) -> None:
    cfg = cli_env / "bad.yaml"
    cfg.write_text(yaml_text)
    assert cli.main(["compare", str(cfg), *flags, "--out", str(cli_env / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lastkd compare:") and message in err
    assert not (cli_env / "out").exists()  # nothing partial
