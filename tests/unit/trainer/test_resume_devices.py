"""Resuming on another device: what applies is restored, what does not is said (never a crash)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lastkd.student.rng import rng_state, set_rng_state
from lastkd.student.training import load_scaler_state


def test_an_empty_scaler_state_from_a_cpu_run_starts_the_scale_afresh() -> None:
    """A fp16 run started on the CPU saved a disabled scaler's (empty) state; an enabled scaler
    (fp16 on a GPU; torch's CPU scaler stands in for it here) refuses to load that: resume must not."""
    enabled = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert enabled.is_enabled()
    with pytest.raises(RuntimeError):  # what the resume used to hit
        enabled.load_state_dict(torch.amp.GradScaler("cpu", enabled=False).state_dict())
    note = load_scaler_state(enabled, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert note is not None and "starts afresh" in note and enabled.get_scale() == 1024.0


def test_a_scaler_state_is_restored_where_it_applies_and_reported_where_not() -> None:
    saved = torch.amp.GradScaler("cpu", init_scale=64.0)
    state = saved.state_dict()
    target = torch.amp.GradScaler("cpu", init_scale=2.0)
    assert load_scaler_state(target, state) is None and target.get_scale() == 64.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert "does not scale" in (load_scaler_state(disabled, state) or "")
    assert load_scaler_state(disabled, disabled.state_dict()) is None  # nothing to say


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA side of a GPU checkpoint")
def test_cuda_rng_states_on_a_machine_without_cuda_are_named_not_dropped_silently() -> None:
    state = rng_state()
    state["cuda_device"] = torch.zeros(16, dtype=torch.uint8)  # as a GPU rank saves it
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 4  # older checkpoints: every visible GPU
    draw = np.random.random()
    skipped = set_rng_state(state)
    assert np.random.random() == draw  # the CPU states are restored all the same
    assert len(skipped) == 2 and "no CUDA here" in skipped[0] and "of 4 GPU(s) (0 here)" in skipped[1]
