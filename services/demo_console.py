"""What ``lastkd demo`` prints: the console (plain lines and one progress line), the number
formats of its lines, the verdict on the student's accuracy and the fixed notices.

Kept apart from the flow so the wording and the terminal handling can change without touching
the steps, and so every step (data, stack, embedding, training, comparison) prints through the
same writer, which owns the one open progress line.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import IO, Any

__all__ = ["FINETUNED_NOTICE", "NOTICE", "REAL_USE", "Console", "accuracy_verdict", "fmt_s", "pct"]

NOTICE = (
    "NOTE: this demo's teacher is RANDOM-INIT (no official weights; LASTKD_TEACHER_RANDOM_INIT=true for\n"
    "its own stack) and its data is SYNTHETIC (rendered stick figures, plus at most one real NTU sample).\n"
    "The numbers show that the plumbing works, not that distillation helps."
)
FINETUNED_NOTICE = (
    "NOTE: this demo's teacher is the tiny VideoMAE V2 FINE-TUNED HERE on the SYNTHETIC data's RGB train split\n"
    "(from random init: no official weights), and its data is SYNTHETIC (rendered stick figures, plus at most\n"
    "one real NTU sample). The teacher knows these classes; real use fine-tunes ViT-B from the K710 weights."
)
REAL_USE = (
    "For real use: set LASTKD_TEACHER_WEIGHTS to the official VideoMAE V2 ViT-B checkpoint\n"
    "(vit_b_k710_dl_from_giant.pth), put NTU RGB+D under a data root (LASTKD_DATA_ROOTS), run\n"
    "`lastkd up`, `lastkd embed /path/to/nturgb+d_rgb`, then train with a config like\n"
    "docs/train_example.yaml (`lastkd train CONFIG.yaml`, or POST /train). See README.md."
)


class Console:
    """Plain lines plus one self-overwriting progress line on a terminal (throttled lines
    elsewhere, so logs of non-interactive runs stay short)."""

    def __init__(self, out: IO[str] | None = None, interval: float = 5.0) -> None:
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.interval = interval
        self._last = 0.0
        self._last_text = ""
        self._open = False
        self._lock = threading.Lock()

    def line(self, text: str = "") -> None:
        """Print one plain line (closing an open progress line first)."""
        with self._lock:
            if self._open:
                self.out.write("\n")
                self._open = False
            self.out.write(text + "\n")
            self.out.flush()

    def progress(self, text: str, force: bool = False) -> None:
        """Show ``text`` as the current progress (overwritten in place on a terminal)."""
        now = time.monotonic()
        with self._lock:
            if self.tty:
                self.out.write("\r\033[K" + text)
                self._open = True
            elif force or (text != self._last_text and now - self._last >= self.interval):
                # Off a terminal: no repeats, at most one line per interval.
                self.out.write(text + "\n")
                self._last, self._last_text = now, text
            self.out.flush()

    def finish(self, text: str) -> None:
        """Close the progress line with its final state."""
        with self._lock:
            if self.tty:
                self.out.write("\r\033[K" + text + "\n")
            else:
                self.out.write(text + "\n")
            self._open = False
            self.out.flush()


def fmt_s(seconds: float) -> str:
    """A duration as the demo prints it: ``42s`` under 90 seconds, else ``3m05s``."""
    seconds = max(0.0, float(seconds))
    return f"{seconds:.0f}s" if seconds < 90 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal, or ``n/a`` when it is missing."""
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def accuracy_verdict(top1: float | None, samples: int | None, classes: int) -> str:
    """How a validation top-1 compares with chance (1/classes), in words: "above chance" only
    when it clears chance by two binomial standard errors on ``samples`` validation samples."""
    if top1 is None or not samples:
        return "no validation samples: accuracy unknown"
    chance = 1.0 / classes
    margin = 2.0 * math.sqrt(chance * (1.0 - chance) / samples)
    if top1 > chance + margin:
        return f"above chance ({100 * chance:.0f}% + {100 * margin:.0f} points on {samples} val samples)"
    return (
        f"NOT distinguishable from chance ({100 * chance:.0f}% +- {100 * margin:.0f} points on "
        f"{samples} val samples): the student did not learn the demo classes in this run"
    )
