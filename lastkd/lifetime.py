"""Child processes that die with their parent: the one rule for every helper process lastkd starts.

A process killed with SIGKILL runs no clean-up code, so its children (training runners, DataLoader
workers, parse pools, decoders) would be re-parented to init and keep running, holding memory and
GPU contexts. On Linux the kernel can deliver a signal to a process when its parent exits
(``prctl(PR_SET_PDEATHSIG)``); the setting is not inherited across ``fork``, so every child that
must not outlive its parent calls :func:`die_with_parent` itself, first thing.

Elsewhere (macOS) the call is a no-op and returns False: those platforms are development hosts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits.

    ``parent_pid`` is the parent the caller expects; when the parent already died before the
    call (the re-parenting happened in the window between fork and this call), the process exits
    at once instead of running orphaned. Returns True when the kernel accepted the request.
    """
    libc = _prctl()
    if libc is None:
        return False
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent is gone already: the signal will never come
    return True
