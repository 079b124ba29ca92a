"""Precise, per-stream BatchNorm statistics: exact, strict-loadable, and used by the eval forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lastkd.models.last_v2 import STREAM_ORDER, LASTv2
from lastkd.student.bn_stats import recompute_bn_stats
from lastkd.student.distill import label_smoothed_nll, smoothed_ce_floor


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(seed: int = 0, n: int = 4, t: int = 8) -> dict[str, torch.Tensor]:
    """Three streams on very different scales (velocity ~1e-2, like per-frame velocity)."""
    g = torch.Generator().manual_seed(seed)
    scale = {"joint": 0.6, "velocity": 0.01, "bone": 0.15}
    shift = {"joint": 0.3, "velocity": 0.0, "bone": -0.1}
    return {s: torch.randn(n, 3, t, 25, 2, generator=g) * scale[s] + shift[s] for s in STREAM_ORDER}


def _model(seed: int = 0) -> LASTv2:
    torch.manual_seed(seed)
    model = LASTv2(num_classes=5, variant="small")
    # a few train-mode passes so the weights' BatchNorm running statistics are the blended,
    # momentum-lagged ones a short run leaves behind
    with torch.no_grad():
        model.train()
        for s in range(3):
            model(_batch(100 + s))
    return model


def _train_mode_no_dropout(model: LASTv2, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward training computes (each stream its own batch), with dropout off."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with torch.no_grad():
        return model(batch)


def test_per_stream_statistics_reproduce_the_training_normalisation() -> None:
    """Recomputed over exactly one batch, per-stream eval statistics ARE that batch's statistics,
    so the eval forward equals the train-mode forward (up to the unbiased-variance factor); the
    blended running statistics and the pooled 'shared' ones do not."""
    model = _model()
    batch = _batch(7)
    want = _train_mode_no_dropout(model, batch)

    with torch.no_grad():
        stale = model.eval()(batch)
    assert (stale - want).abs().max() > 0.05  # the old eval: far from what training computed

    recompute_bn_stats(model, [batch], torch.device("cpu"), STREAM_ORDER, per_stream=False)
    with torch.no_grad():
        shared = model.eval()(batch)
    assert not model.has_stream_bn_stats()
    assert (shared - want).abs().max() > 1e-3  # one blended set cannot match three streams

    recompute_bn_stats(model, [batch], torch.device("cpu"), STREAM_ORDER, per_stream=True)
    assert model.has_stream_bn_stats()
    with torch.no_grad():
        got = model.eval()(batch)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_input_bn_gets_each_streams_exact_variance() -> None:
    model = _model()
    batches = [_batch(s) for s in range(3)]
    recompute_bn_stats(model, batches, torch.device("cpu"), STREAM_ORDER)
    for k, name in enumerate(STREAM_ORDER):
        x = torch.cat([b[name] for b in batches]).permute(1, 0, 2, 3, 4).reshape(3, -1).double()
        torch.testing.assert_close(model.data_bn[k].running_mean.double(), x.mean(dim=1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model.data_bn[k].running_var.double(), x.var(dim=1), atol=1e-8, rtol=1e-4)
    # velocity: ~1e-4, not the ~0.9**n + 1e-4 momentum leaves after n steps
    assert model.data_bn[1].running_var.max() < 2e-4


def test_state_dict_stays_strict_loadable_and_counters_untouched() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recompute_bn_stats(model, [_batch(1), _batch(2)], torch.device("cpu"), STREAM_ORDER)
    after = model.state_dict()
    assert list(after) == list(before)  # no new keys: the per-stream buffers are non-persistent
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    fresh = LASTv2(num_classes=5, variant="small")
    fresh.load_state_dict(after, strict=True)
    assert not fresh.has_stream_bn_stats()
    # per-stream statistics travel separately and round-trip
    fresh.set_stream_bn_stats(model.stream_bn_stats())
    batch = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(batch), model.eval()(batch))


@pytest.mark.faults
def test_bad_stream_statistics_are_refused_whole() -> None:
    model = _model()
    good = {}
    recompute_bn_stats(model, [_batch(0)], torch.device("cpu"), STREAM_ORDER)
    good = model.stream_bn_stats()
    key = next(iter(good))
    with pytest.raises(ValueError, match="missing"):
        model.set_stream_bn_stats({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="expected shape"):
        model.set_stream_bn_stats({**good, key: good[key][:2]})
    bad_var = next(k for k in good if k.endswith("stream_var"))
    with pytest.raises(ValueError, match="non-finite or negative"):
        model.set_stream_bn_stats({**good, bad_var: -good[bad_var]})
    assert torch.equal(model.stream_bn_stats()[key], good[key])  # unchanged after refusals
    with pytest.raises(ValueError, match="no batches"):
        recompute_bn_stats(model, [], torch.device("cpu"), STREAM_ORDER)


@pytest.mark.parametrize(("classes", "floor"), [(60, 0.72), (5, 0.39), (2, 0.199)])
def test_ce_floor_is_what_smoothed_nll_reaches_at_best(classes: int, floor: float) -> None:
    got = smoothed_ce_floor(0.1, classes)
    assert got == pytest.approx(floor, abs=0.01)
    # the smoothed target itself attains it, and anything sharper is worse
    target = torch.zeros(1, dtype=torch.int64)
    best = torch.full((1, classes), 0.1 / classes)
    best[0, 0] += 0.9
    assert label_smoothed_nll(best.log(), target, 0.1).item() == pytest.approx(got, rel=1e-5)
    sharp = torch.full((1, classes), 1e-3 / classes)
    sharp[0, 0] = 1 - 1e-3
    assert label_smoothed_nll(sharp.log(), target, 0.1).item() > got
