"""The experiment's pure parts: config validation, expansion into children, and the report's
statistics recomputed independently from hand-made child results (no training here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lastkd.student.config import ConfigError
from lastkd.student.experiment import (
    ChildResult,
    ExperimentConfig,
    ExperimentError,
    build_report,
    expand,
    interval,
    render_markdown,
    t_critical,
    write_report,
)

# Two-sided 95% Student-t critical values from published tables (independent of the code).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


def base(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "exp",
        "data": {"path": "/data/synth/skeletons"},
        "epochs": 2,
        "distill": {"feature_set": "fs-1", "alpha_start": 0.5, "schedule": "constant"},
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_critical_matches_tables(df: int) -> None:
    assert t_critical(df) == pytest.approx(T_TABLE[df], abs=1e-3)


def test_default_arms_and_expansion_pair_by_seed() -> None:
    exp = ExperimentConfig.from_dict(base())  # a plain training config: the default comparison
    assert list(exp.arms) == ["ce", "kd", "kd-shuffled"] and exp.seeds == (0, 1, 2)
    kids = expand(exp)
    assert [(c.arm, c.seed) for c in kids[:3]] == [("ce", 0), ("kd", 0), ("kd-shuffled", 0)]
    assert len(kids) == 9 and len({c.config.name for c in kids}) == 9
    by = {(c.arm, c.seed): c.config for c in kids}
    assert not by[("ce", 1)].distill.enabled and by[("kd", 1)].distill.enabled
    assert (
        by[("kd-shuffled", 2)].distill.teacher_order == "shuffled" and by[("kd", 2)].distill.teacher_order == "joined"
    )
    # within a seed the arms differ only by their overrides (and the child name)
    ce, kd = by[("ce", 1)].training_dict(), by[("kd", 1)].training_dict()
    assert {k for k in ce if ce[k] != kd[k]} == {"name", "distill"} and ce["seed"] == kd["seed"] == 1


def test_dotted_overrides_and_selection() -> None:
    exp = ExperimentConfig.from_dict(
        {
            "name": "e",
            "base": base(),
            "seeds": [3, 5],
            "arms": {"ce": {"distill.alpha_start": 0.0}, "kd-hi": {"distill": {"alpha_start": 0.9}}},
        }
    )
    assert exp.arm_config("kd-hi", 5).distill.alpha_start == 0.9 and exp.arm_config("kd-hi", 5).seed == 5
    sel = exp.select(arms=["kd-hi"], seeds=2)
    assert list(sel.arms) == ["ce", "kd-hi"] and sel.seeds == (0, 1)


@pytest.mark.faults
@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"name": "e", "base": base(epochs=0)}, "base.epochs"),
        (
            {"name": "e", "base": base(), "arms": {"ce": {}, "kd": {"distill": {"alpha_start": 2}}}},
            "arms.kd.distill.alpha_start",
        ),
        (
            {"name": "e", "base": base(), "arms": {"ce": {}, "kd": {"distill": {"teacher_order": "sorted"}}}},
            "arms.kd.distill.teacher_order",
        ),
        ({"name": "e", "base": base(), "arms": {"ce": {}, "kd": {"seed": 4}}}, "arms.kd.seed"),
        ({"name": "e", "base": base(), "arms": {"ce": {}, "kd": {"data.path": "/etc"}}}, "arms.kd.data.path"),
        ({"name": "e", "base": base(), "arms": {"kd": {}}}, "baseline"),
        ({"name": "e", "base": base(), "seeds": [1, 1]}, "seeds"),
        ({"name": "e", "base": base(), "seeds": [True]}, "seeds"),
        ({"name": "e", "base": base(), "arms": {"ce": {}, "bad/arm": {}}}, "arm name"),
        ({"name": "e", "base": base(distill={})}, "base.distill"),  # kd arms == ce arm: nothing to compare
        ({"name": "e", "base": base(), "colour": 1}, "colour"),
    ],
)
def test_bad_experiment_configs_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(raw)
    assert field in str(info.value)


def child(
    arm: str,
    seed: int,
    top1: float,
    top5: float,
    per_class: list[float],
    distill: float = 0.0,
    jitter: float | None = None,
    obj: float | None = None,
) -> ChildResult:
    metrics = {
        "top1": top1,
        "top5": top5,
        "per_class": [{"index": i, "name": f"A{i + 1:03d}", "count": 2, "accuracy": a} for i, a in enumerate(per_class)]
        + [{"index": len(per_class), "name": "empty", "count": 0, "accuracy": None}],
        "object_classes": {"classes": [0], "count": 2, "top1": obj},
        "robustness": {} if jitter is None else {"jitter@0.05": {"top1": jitter, "drop": top1 - jitter}},
    }
    history = [
        {"epoch": 1, "train_total": 2.0, "train_distill": distill + 0.3, "val_top1": 0.1},
        {"epoch": 2, "train_total": 1.0, "train_distill": distill, "val_top1": top1},
    ]
    return ChildResult(arm, seed, metrics, history)


def test_report_numbers_are_recomputed_from_children(tmp_path: Path) -> None:
    exp = ExperimentConfig.from_dict({"name": "e", "base": base(), "seeds": [0, 1, 2]})
    kids = [
        child("ce", 0, 0.50, 0.9, [0.5, 0.5], jitter=0.4, obj=0.5),
        child("ce", 1, 0.60, 0.9, [0.6, 0.4], jitter=0.5, obj=0.5),
        child("ce", 2, 0.55, 1.0, [0.5, 0.7], jitter=0.45, obj=0.6),
        child("kd", 0, 0.70, 1.0, [0.7, 0.5], distill=0.1, jitter=0.6, obj=0.7),
        child("kd", 1, 0.80, 1.0, [0.9, 0.6], distill=0.2, jitter=0.7, obj=0.8),
        child("kd", 2, 0.72, 1.0, [0.8, 0.7], distill=0.15, jitter=0.7, obj=0.9),
        child("kd-shuffled", 0, 0.52, 0.9, [0.5, 0.6], distill=0.5, jitter=0.4, obj=0.5),
        child("kd-shuffled", 1, 0.58, 0.9, [0.5, 0.6], distill=0.6, jitter=0.5, obj=0.6),
        child("kd-shuffled", 2, 0.60, 0.9, [0.6, 0.4], distill=0.4, jitter=0.5, obj=0.5),
    ]
    rep = build_report(exp, kids)

    def t_iv(values: list[float]) -> tuple[float, float, float]:
        n = len(values)
        m = sum(values) / n
        sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
        h = T_TABLE[n - 1] * sd / math.sqrt(n)
        return m, m - h, m + h

    def check(iv: dict[str, Any], values: list[float]) -> None:
        m, lo, hi = t_iv(values)
        assert (
            iv["mean"] == pytest.approx(m)
            and iv["lo"] == pytest.approx(lo, abs=1e-3)
            and iv["hi"] == pytest.approx(hi, abs=1e-3)
        )
        assert iv["within_noise"] == (lo <= 0 <= hi)

    check(rep["per_arm"]["kd"]["top1"], [0.70, 0.80, 0.72])
    check(rep["paired"]["kd"]["top1"], [0.20, 0.20, 0.17])
    check(rep["paired"]["kd-shuffled"]["top1"], [0.02, -0.02, 0.05])
    check(rep["paired"]["kd"]["robustness"]["jitter@0.05"], [0.2, 0.2, 0.25])
    check(rep["paired"]["kd"]["object_top1"], [0.2, 0.3, 0.3])
    pc = rep["paired"]["kd"]["per_class"]
    assert [c["name"] for c in pc] == ["A001", "A002"]  # the class without samples is left out
    check(pc[0]["diff"], [0.2, 0.3, 0.3])
    check(rep["per_arm"]["kd"]["final_distill_loss"], [0.1, 0.2, 0.15])
    assert rep["per_arm"]["ce"]["final_distill_loss"] is None  # ce does not distil
    assert rep["distill_loss_ratio"]["kd-shuffled/kd"] == pytest.approx(0.5 / 0.15)
    assert rep["per_arm"]["kd"]["curves"]["train_distill"] == pytest.approx([0.45, 0.15])
    text = " ".join(rep["summary"])
    assert "kd vs ce, top-1: +19.00 points" in text and "a real difference" in text
    assert "kd-shuffled vs ce, top-1: +1.67 points" in text and "within noise" in text

    paths = write_report(rep, tmp_path / "out")
    assert {"json", "markdown", "accuracy.png", "per_class_diff.png", "loss_curves.png"} <= set(paths)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "| kd |" in render_markdown(rep)


def test_incomplete_seeds_are_left_out_and_the_rest_stays_paired() -> None:
    exp = ExperimentConfig.from_dict(
        {"name": "e", "base": base(), "seeds": [0, 1], "arms": {"ce": {}, "kd": {"distill.alpha_start": 0.9}}}
    )
    kids = [child("ce", 0, 0.5, 1, [0.5]), child("kd", 0, 0.6, 1, [0.6]), child("ce", 1, 0.5, 1, [0.5])]
    rep = build_report(exp, kids)
    assert rep["seeds"] == [0] and rep["missing"] == ["kd-s1"]
    assert rep["paired"]["kd"]["top1"]["lo"] is None and "1 seed" in rep["summary"][0]


@pytest.mark.faults
def test_report_refuses_foreign_duplicate_or_no_complete_seed() -> None:
    exp = ExperimentConfig.from_dict({"name": "e", "base": base(), "seeds": [0]})
    with pytest.raises(ExperimentError, match="not part"):
        build_report(exp, [child("ce", 7, 0.5, 1, [0.5])])
    with pytest.raises(ExperimentError, match="twice"):
        build_report(exp, [child("ce", 0, 0.5, 1, [0.5])] * 2)
    with pytest.raises(ExperimentError, match="no seed"):
        build_report(exp, [child("ce", 0, 0.5, 1, [0.5])])


def test_interval_single_value_has_no_interval() -> None:
    iv = interval([0.3])
    assert iv["lo"] is None and iv["within_noise"] is None and iv["mean"] == 0.3
