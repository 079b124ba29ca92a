"""Child processes that die with the process they work for.

A helper process (a decoder worker, a forkserver) that outlives its parent after a ``kill -9``
keeps its memory (a decoder holds hundreds of MB) and its open files for as long as nobody ends
it by hand. Two mechanisms, used together:

* :func:`die_with_parent`: the Linux parent-death signal (``prctl(PR_SET_PDEATHSIG)``), delivered
  by the kernel when the process that forked this one exits, however it exits;
* :func:`watch_process`: a daemon thread that ends this process when a given pid (the real owner,
  which may be a grandparent: pool workers are forked by a forkserver) is gone. It waits on a
  pidfd where the kernel has them (no polling, no pid reuse), else polls;
* :func:`follow_owner_from_env`: the same for a supervised service (``lastkd up`` names itself in
  ``LASTKD_LIFELINE_PID``), which then shuts down in order (SIGTERM to itself).

Both are no-ops where the platform lacks them; nothing here raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
import time

__all__ = ["LIFELINE_ENV", "die_with_parent", "follow_owner_from_env", "watch_process"]

# Set by a supervisor (``lastkd up``) in its children's environment: the pid they live for.
LIFELINE_ENV = "LASTKD_LIFELINE_PID"
_PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; True when set.

    Call it first thing in the child (the setting is not inherited across ``fork``). If the
    parent is already gone (this process was reparented before the call, or is no longer the
    child of ``parent_pid`` when the caller knows who forked it), the process exits at once, as
    the signal would have done.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if parent_pid is None else parent_pid
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # Not "parent == 1": in a container the service itself is pid 1 and its children are legitimate.
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    return True


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def watch_process(pid: int, exit_code: int = 1, *, sig: int | None = None, grace_s: float = 30.0) -> threading.Thread:
    """Start a daemon thread that ends this process once ``pid`` has exited.

    With ``sig`` None the end is immediate (``os._exit``). With a signal (SIGTERM), the process
    sends it to itself so that its own orderly shutdown runs (a server closes its store, a
    Celery worker stops its pool), and exits anyway ``grace_s`` seconds later. When ``pid`` is
    already gone the process ends the same way at once.
    """
    try:
        fd: int | None = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except ProcessLookupError:
        fd, pid_gone = None, True
    except OSError:
        fd, pid_gone = None, False
    else:
        pid_gone = False

    def end() -> None:
        if sig is not None:
            os.kill(os.getpid(), sig)
            time.sleep(grace_s)
        os._exit(exit_code)

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while not _gone(pid):
                time.sleep(POLL_S)
        end()

    if pid_gone or (fd is None and _gone(pid)):
        if sig is None:
            os._exit(exit_code)
        # The signal handlers may not be installed yet: deliver it from a thread a moment later.
        fd = None
    thread = threading.Thread(target=watch, name=f"lifeline-{pid}", daemon=True)
    thread.start()
    return thread


def follow_owner_from_env(sig: int = signal.SIGTERM, grace_s: float = 30.0) -> threading.Thread | None:
    """Watch the pid named by ``LASTKD_LIFELINE_PID`` (set by ``lastkd up`` for its children).

    The variable is removed from this process's environment so that its own children (pool
    processes, decoders) do not follow the grandparent: they follow this process instead.
    """
    raw = os.environ.pop(LIFELINE_ENV, None)
    if not raw or not raw.isdigit():
        return None
    return watch_process(int(raw), sig=sig, grace_s=grace_s)
