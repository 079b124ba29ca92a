"""Distillation config, schedules, loss maths (against hand computation) and gradient flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lastkd.models.last_v2 import LASTv2
from lastkd.student.distill import (
    DistillConfig,
    FeatureStats,
    Projector,
    alpha_at,
    distill_loss,
    feature_stats,
    label_smoothed_nll,
    total_loss,
)

FS = "videomae_v2_vit_b-random-init-3f2a9c1b7d0e"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The CPUs are shared; one intra-op thread avoids OpenMP stalls when they are oversubscribed.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cfg(**kw: object) -> DistillConfig:
    return DistillConfig(feature_set=FS, **kw)


class RaisingProjector(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("projector must not run when alpha == 0")


# ---------------------------------------------------------------- config


def test_config_defaults_and_enabled() -> None:
    default = DistillConfig()
    assert (default.alpha_start, default.alpha_end, default.projector_hidden) == (0.5, 0.0, 512)
    assert default.feature_set is None and not default.enabled
    assert cfg().enabled
    assert not cfg(alpha_start=0.0, alpha_end=0.0).enabled
    assert cfg(alpha_start=0.0, alpha_end=0.3).enabled
    assert not cfg(schedule="constant", alpha_start=0.0, alpha_end=0.3).enabled
    with pytest.raises(ValidationError):
        default.alpha_start = 0.1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha_start": 1.5},
        {"alpha_end": -0.1},
        {"alpha_start": float("nan")},
        {"alpha_start": True},
        {"schedule": "exponential"},
        {"loss": "kl"},
        {"teacher_norm": "zscore"},
        {"projector_hidden": 0},
        {"feature_set": ""},
        {"feature_set": "set id"},
        {"feature_set": "id\n"},
        {"unknown_field": 1},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError):
        DistillConfig(**bad)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_alpha_schedule_endpoints_and_monotonic(schedule: str) -> None:
    c = cfg(alpha_start=0.8, alpha_end=0.2, schedule=schedule)
    values = [alpha_at(c, p / 100) for p in range(101)]
    assert values[0] == pytest.approx(0.8)
    assert values[-1] == pytest.approx(0.8 if schedule == "constant" else 0.2)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert alpha_at(c, -3.0) == values[0] and alpha_at(c, 7.0) == values[-1]  # clamped


def test_alpha_schedule_intermediate_values() -> None:
    lin = cfg(alpha_start=0.5, alpha_end=0.0, schedule="linear")
    cos = cfg(alpha_start=0.5, alpha_end=0.0, schedule="cosine")
    assert alpha_at(lin, 0.25) == pytest.approx(0.375)
    assert alpha_at(cos, 0.25) == pytest.approx(0.25 * (1 + math.cos(math.pi / 4)))
    assert alpha_at(cos, 0.5) == pytest.approx(0.25)
    rising = cfg(alpha_start=0.0, alpha_end=1.0, schedule="linear")
    assert alpha_at(rising, 0.3) == pytest.approx(0.3)
    assert alpha_at(DistillConfig(alpha_start=0.9), 0.0) == 0.0  # no feature set -> disabled
    for bad in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(ValueError, match="progress"):
            alpha_at(lin, bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- distill_loss maths


def _data(n: int = 4, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_mse_and_cosine_against_hand_computation() -> None:
    s, t = _data()
    mask = torch.tensor([True, False, True, True])
    sn, tn = s.numpy().astype(np.float64), t.numpy().astype(np.float64)
    idx = [0, 2, 3]
    mse = np.mean([np.mean((sn[i] - tn[i]) ** 2) for i in idx])
    cos = np.mean([1 - sn[i] @ tn[i] / (np.linalg.norm(sn[i]) * np.linalg.norm(tn[i])) for i in idx])
    assert distill_loss(s, t, mask, cfg(loss="mse")).item() == pytest.approx(mse, rel=1e-5)
    assert distill_loss(s, t, mask, cfg(loss="cosine")).item() == pytest.approx(cos, rel=1e-5)
    tl2 = tn / np.linalg.norm(tn, axis=1, keepdims=True)
    mse_l2 = np.mean([np.mean((sn[i] - tl2[i]) ** 2) for i in idx])
    assert distill_loss(s, t, mask, cfg(loss="mse", teacher_norm="l2")).item() == pytest.approx(mse_l2, rel=1e-5)
    # l2 normalisation makes the loss independent of the teacher's scale
    assert distill_loss(s, 7.0 * t, mask, cfg(loss="mse", teacher_norm="l2")).item() == pytest.approx(mse_l2, rel=1e-5)


def test_standardize_uses_the_given_stats() -> None:
    s, t = _data(d=3)
    mask = torch.ones(4, dtype=torch.bool)
    stats = FeatureStats(mean=torch.tensor([1.0, -2.0, 0.5]), std=torch.tensor([2.0, 0.5, 4.0]))
    c = cfg(loss="mse", teacher_norm="standardize")
    expected = ((s - (t - stats.mean) / stats.std) ** 2).mean()
    assert distill_loss(s, t, mask, c, stats).item() == pytest.approx(expected.item(), rel=1e-6)
    other = FeatureStats(mean=torch.zeros(3), std=torch.ones(3))
    assert distill_loss(s, t, mask, c, other).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs FeatureStats"):
        distill_loss(s, t, mask, c, None)
    with pytest.raises(ValueError, match="FeatureStats have shapes"):
        distill_loss(s, t, mask, c, FeatureStats(torch.zeros(5), torch.ones(5)))


def test_masked_samples_are_ignored_including_gradients() -> None:
    s, t = _data()
    mask = torch.tensor([True, False, True, False])
    for kind in ("mse", "cosine"):
        c = cfg(loss=kind, teacher_norm="l2")
        s1 = s.clone().requires_grad_()
        loss1 = distill_loss(s1, t, mask, c)
        loss1.backward()
        t2 = t.clone()
        t2[1] = 1e6
        t2[3] = float("nan")  # garbage in rows without a teacher must not leak
        s2 = s.clone().requires_grad_()
        loss2 = distill_loss(s2, t2, mask, c)
        loss2.backward()
        assert loss1.item() == loss2.item()
        assert torch.equal(s1.grad, s2.grad)
        assert torch.count_nonzero(s2.grad[[1, 3]]) == 0 and torch.count_nonzero(s2.grad[[0, 2]]) > 0


def test_all_masked_is_zero_and_finite() -> None:
    s, t = _data()
    t[:] = float("nan")
    s.requires_grad_()
    loss = distill_loss(s, t, torch.zeros(4, dtype=torch.bool), cfg(loss="cosine"))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(s.grad).all() and torch.count_nonzero(s.grad) == 0


def test_distill_loss_rejects_bad_shapes() -> None:
    s, t = _data()
    mask = torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="do not match"):
        distill_loss(s, t[:, :5], mask, cfg())
    with pytest.raises(ValueError, match="has_teacher_mask"):
        distill_loss(s, t, mask.int(), cfg())
    with pytest.raises(ValueError, match="has_teacher_mask"):
        distill_loss(s, t, mask[:3], cfg())
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        distill_loss(s[0], t[0], mask, cfg())


def test_float16_teacher_is_accepted() -> None:
    s, t = _data()
    mask = torch.ones(4, dtype=torch.bool)
    ref = distill_loss(s, t.half().float(), mask, cfg(loss="mse"))
    assert distill_loss(s, t.half(), mask, cfg(loss="mse")).item() == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------- CE and total loss


def test_label_smoothed_nll_against_hand_computation() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 6, 3, 3, 1])
    logprob = torch.log_softmax(logits, dim=1)
    lp = logprob.numpy().astype(np.float64)
    hand = np.mean([0.9 * -lp[i, y] + 0.1 * -lp[i].mean() for i, y in enumerate(target.tolist())])
    assert label_smoothed_nll(logprob, target, 0.1).item() == pytest.approx(hand, rel=1e-6)
    # For normalised log-probabilities this is torch's label-smoothed cross-entropy on the logits.
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert label_smoothed_nll(logprob, target, 0.1).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="target"):
        label_smoothed_nll(logprob, target.float(), 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        label_smoothed_nll(logprob, target, 1.0)


def _batch(n: int = 4, classes: int = 5, s_dim: int = 8, t_dim: int = 6) -> dict:
    g = torch.Generator().manual_seed(2)
    return {
        "logprob": torch.log_softmax(torch.randn(n, classes, generator=g), dim=1),
        "target": torch.randint(0, classes, (n,), generator=g),
        "student": torch.rand(n, s_dim, generator=g),
        "teacher": torch.randn(n, t_dim, generator=g),
    }


def test_alpha_zero_never_runs_the_projector() -> None:
    b = _batch()
    ce = label_smoothed_nll(b["logprob"], b["target"], 0.1)
    loss, parts = total_loss(
        b["logprob"],
        b["target"],
        0.1,
        b["student"],
        b["teacher"],
        torch.ones(4, dtype=torch.bool),
        0.0,
        RaisingProjector(),
        cfg(),
    )
    assert loss.item() == ce.item() and parts["distill"].item() == 0.0 and parts["alpha"] == 0.0
    loss, _ = total_loss(b["logprob"], b["target"], 0.1, None, None, None, 0.0, None, cfg())
    assert loss.item() == ce.item()
    with pytest.raises(ValueError, match="alpha > 0 needs"):
        total_loss(b["logprob"], b["target"], 0.1, None, None, None, 0.5, None, cfg())
    with pytest.raises(ValueError, match="alpha must be"):
        total_loss(b["logprob"], b["target"], 0.1, None, None, None, 1.5, None, cfg())


def test_total_loss_combines_ce_and_distill() -> None:
    b = _batch()
    torch.manual_seed(0)
    proj = Projector(8, 6, hidden=16)
    mask = torch.tensor([True, True, False, True])
    c = cfg(loss="mse")
    loss, parts = total_loss(b["logprob"], b["target"], 0.1, b["student"], b["teacher"], mask, 0.3, proj, c)
    ce = label_smoothed_nll(b["logprob"], b["target"], 0.1)
    with torch.no_grad():
        p = proj(b["student"])
    d = ((p - b["teacher"]) ** 2).mean(dim=1)[mask].mean()
    assert loss.item() == pytest.approx((0.7 * ce + 0.3 * d).item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce.item()) and parts["distill"].item() == pytest.approx(d.item())
    assert parts["alpha"] == 0.3 and parts["alpha_effective"].item() == pytest.approx(0.3)


def test_total_loss_all_masked_is_ce_only_and_finite() -> None:
    b = _batch()
    b["teacher"][:] = float("nan")
    proj = Projector(8, 6, hidden=16)
    loss, parts = total_loss(
        b["logprob"],
        b["target"],
        0.1,
        b["student"],
        b["teacher"],
        torch.zeros(4, dtype=torch.bool),
        0.6,
        proj,
        cfg(loss="cosine", teacher_norm="l2"),
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(label_smoothed_nll(b["logprob"], b["target"], 0.1).item(), rel=1e-7)
    assert parts["distill"].item() == 0.0 and parts["alpha_effective"].item() == 0.0


def test_gradients_reach_student_features_and_projector() -> None:
    b = _batch()
    proj = Projector(8, 6, hidden=16)
    student = b["student"].clone().requires_grad_()
    logprob = b["logprob"].clone().requires_grad_()
    loss, _ = total_loss(
        logprob,
        b["target"],
        0.1,
        student,
        b["teacher"],
        torch.tensor([True, False, True, True]),
        0.5,
        proj,
        cfg(loss="cosine"),
    )
    loss.backward()
    assert torch.count_nonzero(student.grad[[0, 2, 3]]) > 0 and torch.count_nonzero(student.grad[1]) == 0
    assert torch.count_nonzero(logprob.grad) > 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in proj.parameters())


def test_end_to_end_with_student_backbone() -> None:
    torch.manual_seed(0)
    model = LASTv2(num_classes=3, variant="small").train()
    proj = Projector(model.feature_dim, 6, hidden=8)
    x = {s: torch.randn(2, 3, 4, 25, 1) for s in ("joint", "bone")}
    out, feat = model.forward_with_features(x)
    loss, _ = total_loss(
        out,
        torch.tensor([0, 2]),
        0.1,
        feat,
        torch.randn(2, 6),
        torch.tensor([True, True]),
        0.5,
        proj,
        cfg(loss="mse", teacher_norm="l2"),
    )
    loss.backward()
    grad = model.backbone[0].gcn.subset_convs[0].weight.grad
    assert torch.isfinite(loss) and grad is not None and torch.count_nonzero(grad) > 0


# ---------------------------------------------------------------- projector and stats


def test_projector_shapes_and_batch_of_one() -> None:
    proj = Projector(256, 768).train()
    assert proj(torch.rand(1, 256)).shape == (1, 768)
    with pytest.raises(ValueError, match=r"\(N, 256\)"):
        proj(torch.rand(2, 128))
    for bad in ({"student_dim": 0}, {"teacher_dim": -1}, {"hidden": 2.5}, {"hidden": True}):
        kw = {"student_dim": 4, "teacher_dim": 4, "hidden": 4, **bad}
        with pytest.raises(ValueError, match="Projector"):
            Projector(**kw)  # type: ignore[arg-type]


def test_feature_stats_against_numpy() -> None:
    arr = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 4)).astype(np.float16)
    arr[:, 3] = 1.5  # constant column: std floored, not zero
    stats = feature_stats(arr)
    ref = arr.astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy(), ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.std.numpy()[:3], ref.std(0)[:3], rtol=1e-6)
    assert stats.std[3].item() == pytest.approx(1e-6) and stats.mean.dtype == torch.float32
    torch.testing.assert_close(feature_stats(torch.from_numpy(arr)).mean, stats.mean)
    for bad in (np.zeros(5), np.zeros((0, 3)), np.array([[1.0, np.nan]]), np.array([["a", "b"]])):
        with pytest.raises(ValueError, match="feature_stats"):
            feature_stats(bad)
