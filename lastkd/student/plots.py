"""The figures of a published student: loss and accuracy curves, per-class accuracy and the
confusion matrix, as PNGs drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: drawing needs neither torch nor the training loop
    from lastkd.student.training import TrainResult

__all__ = ["confusion_view", "present_classes", "write_plots"]


def present_classes(metrics: Mapping[str, Any]) -> list[int]:
    """Indices of the classes that have validation samples (what the per-class plots show)."""
    return [p["index"] for p in metrics.get("per_class") or [] if p.get("count")]


def confusion_view(metrics: Mapping[str, Any]) -> tuple[list[int], list[str], np.ndarray]:
    """(class indices, names, counts) of the confusion matrix restricted to the classes that occur
    in the data: with validation samples, or predicted for some sample."""
    full = np.asarray(metrics.get("confusion") or [[]], dtype=np.float64)
    if full.size == 0:
        return [], [], np.zeros((0, 0))
    used = sorted(set(present_classes(metrics)) | set(np.flatnonzero(full.sum(axis=0) > 0).tolist()))
    names = {p["index"]: p["name"] for p in metrics.get("per_class") or []}
    return used, [names.get(i, f"A{i + 1:03d}") for i in used], full[np.ix_(used, used)]


def _short_name(name: str, index: int, width: int = 28) -> str:
    """A tick label: the class name (``synthetic: `` prefix dropped), shortened to ``width``."""
    text = str(name).removeprefix("synthetic: ").strip() or f"A{index + 1:03d}"
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def write_plots(result: TrainResult, out_dir: Path) -> list[str]:
    """Loss/accuracy curves, per-class accuracy and confusion matrix as PNGs (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    hist = result.history
    epochs = [h["epoch"] for h in hist]

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        written.append(name)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, label in (
        ("train_total", "train loss"),
        ("train_ce", "train CE"),
        ("train_distill", "train distill"),
        ("val_nll", "val NLL"),
    ):
        ys = [h.get(key) for h in hist]
        if any(y is not None for y in ys):
            ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if ax.get_lines():
        ax.legend()
    ax.set_title(f"{result.config.name}: losses")
    save(fig, "loss.png")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5")):
        ys = [h.get(key) for h in hist]
        if any(y is not None for y in ys):
            ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    if ax.get_lines():
        ax.legend()
    ax.set_title(f"{result.config.name}: validation accuracy")
    save(fig, "accuracy.png")

    per_class = result.metrics.get("per_class") or []
    shown = present_classes(result.metrics)
    if shown:
        by_index = {p["index"]: p for p in per_class}
        labels = [_short_name(by_index[i]["name"], i) for i in shown]
        fig = Figure(figsize=(max(6, len(shown) * 0.35), 4.5))
        ax = fig.add_subplot()
        acc = [np.nan if by_index[i]["accuracy"] is None else by_index[i]["accuracy"] for i in shown]
        objects = set(result.metrics.get("object_classes", {}).get("classes", []))
        colors = ["tab:orange" if i in objects else "tab:blue" for i in shown]
        ax.bar(range(len(shown)), acc, color=colors)
        ax.set_xticks(
            range(len(shown)),
            labels,
            rotation=60 if len(shown) > 6 else 0,
            ha="right" if len(shown) > 6 else "center",
            fontsize=8,
        )
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(
            f"per-class validation accuracy ({len(shown)} classes with val samples"
            + ("; orange = object interaction)" if objects else ")")
        )
        save(fig, "per_class.png")

    confusion = result.metrics.get("confusion")
    if confusion and shown:
        # Only classes that occur in the data (as true or predicted class): a 60-way head trained
        # on 5 classes would otherwise draw a 60x60 matrix with 5 meaningful rows.
        used, tick_names, cm = confusion_view(result.metrics)
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        size = max(5.0, 0.35 * len(used) + 3)
        fig = Figure(figsize=(size + 1, size))
        ax = fig.add_subplot()
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax)
        ticks = [_short_name(n, i) for i, n in zip(used, tick_names)]
        ax.set_xticks(range(len(used)), ticks, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(used)), ticks, fontsize=7)
        if len(used) <= 20:
            for r in range(len(used)):
                for c in range(len(used)):
                    if cm[r, c]:
                        ax.text(
                            c,
                            r,
                            f"{int(cm[r, c])}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="black" if norm[r, c] > 0.5 else "white",
                        )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title("confusion matrix (row-normalised; counts)")
        save(fig, "confusion.png")
    return written
