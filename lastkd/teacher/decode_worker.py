"""Start-up of a decoder worker process: kept free of heavy imports on purpose.

The pool sends this initializer to each new worker by reference, so the worker imports this
module before anything else; importing the engine instead would take seconds (torch, PyAV)
during which a killed owner would leave the worker orphaned. The lifeline is set first.
"""

from __future__ import annotations

import os

from lastkd.lifeline import die_with_parent, watch_process

__all__ = ["init_decode_worker"]


def init_decode_worker(owner_pid: int) -> None:
    """Tie this worker's life to its owner, then keep each decoder to one thread."""
    # A decoder holds hundreds of MB: it must not outlive the service or CLI it decodes for,
    # even after a kill -9. Its parent is the forkserver (killed with it: parent-death signal);
    # its owner is the process that made the pool (watched through a pidfd).
    die_with_parent()
    watch_process(owner_pid)
    # One decoder per process: several threads each would oversubscribe the cores the pool
    # already spreads work over (and the inference thread's cores on CPU).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
