"""TensorBoard event files for a training run (optional: needs the ``tensorboard`` package).

Every run started by :func:`lastkd.student.training.train` writes ``<run_dir>/tensorboard/``
when ``tensorboard`` is importable (``pip install 'lastkd[tensorboard]'``); without it training
runs as before and :func:`available` says why there is no log. The logger is a progress hook,
so it sees exactly the numbers the run records:

* per optimiser step (tag ``step/<key>``, x = global step, 1-based): every loss part of the step
  (``ce``, ``distill``, ``total``, ``alpha_effective``, ``grad_norm``), ``alpha`` and ``lr``;
* per epoch (tag ``epoch/<history key>``, x = epoch, 1-based): the epoch's history entry as it
  goes to ``metrics.json`` (``train_ce``, ``train_distill``, ``train_total``, ``train_grad_norm``,
  ``alpha_end``, ``lr``, ``val_top1``, ``val_top5``, ``val_nll``).

Only the main process logs (the engine emits progress on rank 0 only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lastkd.student.training import Progress

LOG_DIR_NAME = "tensorboard"
INSTALL_HINT = "pip install 'lastkd[tensorboard]'"


def available() -> bool:
    """True when the ``tensorboard`` package (which torch's SummaryWriter needs) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


def log_dir(run_dir: Path | str) -> Path:
    """Where a run's event files go: ``<run_dir>/tensorboard``."""
    return Path(run_dir) / LOG_DIR_NAME


class TensorBoardLogger:
    """Writes a run's progress as TensorBoard scalars; use :meth:`on_progress` as a progress hook."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        # Opened on the first event: a run that fails before its first step leaves no folder behind.
        self.writer: Any = None

    def _scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.directory))
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def on_progress(self, p: Progress) -> None:
        """Log one progress event (train step or epoch end; the other phases carry nothing new)."""
        if p.phase == "train":
            step = p.epoch * p.steps_per_epoch + p.step
            self._scalars("step", {**p.losses, "alpha": p.alpha, "lr": p.lr}, step)
        elif p.phase == "eval":
            # the same numbers, under the same names, as the history entry of this epoch
            entry = {f"train_{k}": v for k, v in p.losses.items()}
            entry.update(alpha_end=p.alpha, lr=p.lr, samples_per_s=p.samples_per_s)
            entry.update({f"val_{k}": v for k, v in (p.val or {}).items()})
            self._scalars("epoch", entry, p.epoch + 1)
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file (if one was opened)."""
        if self.writer is not None:
            self.writer.close()
