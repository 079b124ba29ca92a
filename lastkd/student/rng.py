"""Random number state of a training run: derived seeds, seeding, and RNG states for checkpoints.

Everything random in a run is a function of the config's seed: the shuffle order and worker
seeds of an epoch come from :func:`mix_seed` over (seed, epoch, ...), and the global torch, numpy
and python states are captured at each epoch boundary (:func:`rng_state`) and restored on resume
(:func:`set_rng_state`), which is what makes an interrupted and resumed CPU run end bit for bit
where an uninterrupted one does.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from lastkd.lifeline import die_with_parent

__all__ = ["mix_seed", "rng_state", "seed_everything", "seed_worker", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs, unlike hash())."""
    seq = np.random.SeedSequence([int(p) % 2**32 for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0]) >> 1


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader of a run: seeds numpy/python from torch's worker seed."""
    # A loader worker must not outlive the process that feeds on it (kill -9 of a runner).
    die_with_parent()
    # torch already seeded the worker with base_seed + worker_id (base_seed from the loader's
    # generator, which we reseed every epoch); derive numpy/python from it for any global use.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, python (and its current CUDA device's) RNG states, loadable
    with weights_only. Only the current device's CUDA state: a rank draws on its own GPU, and a
    list of every visible GPU's state cannot be restored where another number of GPUs is visible."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True gives a dict only for a non-MT19937 generator
        raise TypeError(f"numpy's global generator is not MT19937 ({np_state.get('bit_generator')})")
    kind, keys, pos, has_gauss, gauss = np_state
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy/python states as tensors and plain values so the checkpoint loads with weights_only
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_internal), py_gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> list[str]:
    """Restore what :func:`rng_state` captured; returns what could not be restored here, in words
    (a CUDA state on a machine without CUDA, the per-GPU list of older checkpoints on another GPU
    count). The CPU states always apply."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    skipped = []
    if "cuda_device" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_device"])
        else:
            skipped.append("the CUDA RNG state (no CUDA here): GPU random draws restart from the seed")
    if "cuda" in state:  # before rng_state kept one device: every visible GPU's state
        cuda_states = state["cuda"]
        if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            here = torch.cuda.device_count() if torch.cuda.is_available() else 0
            skipped.append(f"the CUDA RNG states of {len(cuda_states)} GPU(s) ({here} here): GPU random draws restart")
    return skipped
