"""Publishing: a completed run becomes a version in the registry, in the Hugging Face layout.

``<registry>/<name>/v<N>/`` (folders, versions, locks and idempotency: :mod:`lastkd.registry`) holds

* ``config.json``         how to rebuild the student (variant, classes, streams, frames), params,
  FLOPs, class names: the model config ``LASTv2.from_pretrained`` reads
* ``model.safetensors``   the student's state dict (no projector); loads strict into ``LASTv2``
  (and into the reference LAST v2; its BatchNorm statistics are the pooled precise ones)
* ``stream_bn.safetensors`` per-stream eval statistics of the backbone BatchNorms (when the run
  recomputed them per stream); ``from_pretrained`` installs them, the reference ignores them
* ``README.md``           the model card: YAML front matter (library, tags, metrics) + summary
  with warnings (synthetic data, random-init teacher)
* ``train_config.yaml``   the full training config
* ``metrics.json``        final metrics incl. per-class accuracy, confusion, robustness; history
* ``lineage.json``        job id, feature set, split, data hash, seed, code version, extras
* ``plots/*.png``         loss and accuracy curves, per-class accuracy, confusion matrix
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file

from lastkd.ids import check_job_id
from lastkd.models.last_v2 import (
    STREAM_BN_FILE,
    STUDENT_CONFIG_FILE,
    STUDENT_FORMAT,
    WEIGHTS_FILE,
    LASTv2,
    num_parameters,
)
from lastkd.registry import LINEAGE_FILE, METRICS_FILE, PublishedStudent, Registry, RegistryError
from lastkd.student.data.dataset import DataInfo
from lastkd.student.training import RunState, TrainResult

MODEL_CARD_FILE = "README.md"
TRAIN_CONFIG_FILE = "train_config.yaml"
SYNTHETIC_MARKER = "synthetic.json"  # written by `lastkd synth` (lastkd.student.synth)


class PublishError(ValueError):
    """A result that cannot be published, or a registry entry that cannot be read."""


# --------------------------------------------------------------------------------------------
# facts about the model and the code
# --------------------------------------------------------------------------------------------
def estimate_flops(model: LASTv2, num_frames: int, streams: tuple[str, ...], bodies: int = 2) -> int:
    """FLOPs (2 x multiply-accumulates, as counted by torch's FlopCounterMode) of one clip's
    eval-mode forward with all ``streams``, ``bodies`` bodies and ``num_frames`` frames."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = {s: torch.zeros(1, 3, num_frames, 25, bodies) for s in streams}
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def code_version() -> str:
    """Package version plus ``git describe`` of the source tree when it is a git checkout."""
    try:
        version = importlib.metadata.version("lastkd")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{version}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _is_synthetic(data_path: Path) -> bool:
    """True when the data folder or its parent carries the marker ``lastkd synth`` writes."""
    base = Path(data_path)
    folder = base if base.is_dir() else base.parent
    for candidate in (folder, folder.parent):
        marker = candidate / SYNTHETIC_MARKER
        if marker.is_file():
            try:
                return bool(json.loads(marker.read_text(encoding="utf-8")).get("synthetic", True))
            except (OSError, ValueError, AttributeError):
                return True
    return False


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------
def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def _skipped_lines(info: DataInfo) -> list[str]:
    if not info.skipped:
        return ["- skipped source files: none"]
    shown = len(info.skipped_first)
    first = f"the first {shown}" if shown < info.skipped else "all"
    lines = [f"- **skipped {info.skipped} unusable source file(s)/sample(s)** ({first} below, also in `metrics.json`):"]
    return lines + [f"  - `{reason}`" for reason in info.skipped_first]


def model_card(result: TrainResult, student: dict[str, Any], lineage: dict[str, Any], warnings: list[str]) -> str:
    """Markdown summary of one published student."""
    cfg, m, info = result.config, result.metrics, result.data_info
    tags = ["skeleton-action-recognition", "last-v2", cfg.data.dataset.replace("_", "-")]
    if cfg.distill.enabled:
        tags.append("knowledge-distillation")
    if lineage.get("synthetic_data"):
        tags.append("synthetic-data")
    front = {
        "library_name": "lastkd",
        "license": "apache-2.0",
        "tags": tags,
        "metrics": ["accuracy"],
        "lastkd": {
            "format": STUDENT_FORMAT,
            "name": cfg.name,
            "version": lineage["version"],
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "job_id": lineage.get("job_id"),
        },
    }
    lines = [
        "---",
        yaml.safe_dump(_jsonable(front), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {cfg.name} v{lineage['version']}",
        "",
    ]
    for w in warnings:
        lines.append(f"> **Warning:** {w}")
    if warnings:
        lines.append("")
    lines += [
        "## Model",
        f"- LAST v2, variant `{cfg.variant}`, {student['num_classes']} classes",
        f"- parameters: {student['params']:,}",
        f"- FLOPs per clip: {student['flops'] / 1e9:.3f} GFLOPs "
        f"({len(student['streams'])} streams x 2 bodies x {student['num_frames']} frames, eval mode)",
        "- the distillation projector is training-only and is not part of this checkpoint",
        "",
        "## Data",
        f"- dataset `{cfg.data.dataset}`, split `{cfg.data.split}`, format `{cfg.data.format}`, streams mode "
        f"`{cfg.data.streams_mode}`",
        f"- train {info.train_size} / val {info.val_size} samples; data hash `{info.data_hash}`",
        *_skipped_lines(info),
        f"- teacher feature set: `{cfg.distill.feature_set or 'none (plain cross-entropy baseline)'}`"
        + (
            f"; coverage train {_pct(info.coverage_train)}, val {_pct(info.coverage_val)}"
            if cfg.distill.enabled
            else ""
        ),
        "",
        "## Training",
        f"- {result.epochs_completed} epochs, batch {cfg.batch_size}, {cfg.optimizer.name} lr {cfg.optimizer.lr}, "
        f"schedule {cfg.schedule.kind}, label smoothing {cfg.label_smoothing}, seed {cfg.seed}",
    ]
    if cfg.distill.enabled:
        d = cfg.distill
        lines.append(
            f"- distillation: alpha {d.alpha_start} -> {d.alpha_end} ({d.schedule}), loss {d.loss}, "
            f"teacher norm {d.teacher_norm}, projector hidden {d.projector_hidden}"
        )
    lines += [
        "",
        "## Metrics (validation)",
        "| metric | value |",
        "|---|---|",
        f"| top-1 | {_pct(m.get('top1'))} |",
        f"| top-5 | {_pct(m.get('top5'))} |",
        f"| mean class accuracy | {_pct(m.get('mean_class_accuracy'))} |",
        f"| object-interaction classes top-1 | {_pct(m.get('object_classes', {}).get('top1'))} |",
        f"| other classes top-1 | {_pct(m.get('non_object_classes', {}).get('top1'))} |",
    ]
    for key, val in (m.get("robustness") or {}).items():
        lines.append(f"| top-1 under {key} | {_pct(val.get('top1'))} (drop {_pct(val.get('drop'))}) |")
    lines += [
        "",
        "Per-class accuracy and the confusion matrix are in `metrics.json` and `plots/`.",
        "",
        "## Use",
        "```python",
        "from lastkd.models.last_v2 import LASTv2",
        'student = LASTv2.from_pretrained("<this folder>")  # strict, eval mode',
        "```",
        "",
        "## Lineage",
    ]
    for key in (
        "job_id",
        "feature_set",
        "dataset",
        "split",
        "data_hash",
        "seed",
        "code_version",
        "config_hash",
        "created",
    ):
        lines.append(f"- {key}: `{lineage.get(key)}`")
    for key, val in (lineage.get("extra") or {}).items():
        lines.append(f"- {key}: `{val}`")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def publish(
    result: TrainResult,
    registry_dir: Path,
    *,
    job_id: str | None = None,
    extra_lineage: Mapping[str, Any] | None = None,
) -> PublishedStudent:
    """Publish a completed run as the next version of ``result.config.name``.

    Idempotent per ``job_id``: if a version of this name already records the job id, that version
    is returned and nothing is written. ``extra_lineage`` (JSON-able) is recorded in lineage.json.
    """
    if result.state is not RunState.COMPLETED:
        raise PublishError(f"only completed runs are published; this run is {result.state.value}")
    cfg = result.config
    registry = Registry(registry_dir)
    try:
        name = registry.check_name(cfg.name)
        if job_id is not None:
            try:
                check_job_id(job_id)
            except ValueError as exc:
                raise RegistryError(f"invalid job id {job_id!r}: {exc}") from None
            existing = registry.find_job(name, job_id)
            if existing is not None:
                return existing
    except RegistryError as exc:
        raise PublishError(str(exc)) from None

    # Build the model first: a state dict that does not fit LAST v2 must fail before anything is written.
    model = LASTv2(num_classes=result.data_info.num_classes, variant=cfg.variant)
    try:
        model.load_state_dict(result.model_state, strict=True)
        model.set_stream_bn_stats(result.stream_bn or None)
    except (RuntimeError, ValueError) as exc:
        raise PublishError(f"result weights do not fit LAST v2 {cfg.variant}: {str(exc)[:300]}") from None

    tmp = registry.staging_dir(name)
    try:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        student = {
            "format": STUDENT_FORMAT,
            "architectures": ["LASTv2"],
            "variant": cfg.variant,
            "num_classes": result.data_info.num_classes,
            "in_channels": model.in_channels,
            "feature_dim": model.feature_dim,
            "streams": list(cfg.data.streams),
            "streams_mode": cfg.data.streams_mode,
            "num_frames": cfg.data.num_frames,
            "params": num_parameters(model),
            "flops": estimate_flops(model, cfg.data.num_frames, tuple(cfg.data.streams)),
            "class_names": result.class_names,
            "bn_stats": "per_stream"
            if result.stream_bn
            else ("running" if cfg.eval.bn_stats == "running" else "shared"),
        }
        # Clone: safetensors refuses tensors that share storage, and the file must be self-contained.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(
            tensors,
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt", "student": STUDENT_FORMAT, "variant": cfg.variant},
        )
        if result.stream_bn:
            stream_bn = {k: v.detach().cpu().contiguous() for k, v in result.stream_bn.items()}
            save_file(stream_bn, str(tmp / STREAM_BN_FILE), metadata={"format": "pt", "student": STUDENT_FORMAT})
        _write_json(tmp / STUDENT_CONFIG_FILE, student)
        (tmp / TRAIN_CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        # data_skipped is the data's report, not a metric: one copy, at the top of metrics.json
        final = {k: v for k, v in result.metrics.items() if k != "data_skipped"}
        _write_json(
            tmp / METRICS_FILE,
            {"final": final, "history": result.history, "data_skipped": result.data_info.data_skipped()},
        )

        feature_set = cfg.distill.feature_set if cfg.distill.enabled else None
        warnings = []
        if _is_synthetic(cfg.data.path):
            warnings.append("trained and evaluated on SYNTHETIC skeletons; the metrics say nothing about NTU RGB+D.")
        if feature_set and "random-init" in feature_set:
            warnings.append("distilled from a RANDOM-INIT teacher (no official weights); the teacher signal is noise.")
        lineage = {
            "name": name,
            "job_id": job_id,
            "feature_set": feature_set,
            "teacher_random_init": bool(feature_set and "random-init" in feature_set),
            "synthetic_data": _is_synthetic(cfg.data.path),
            "dataset": cfg.data.dataset,
            "split": cfg.data.split,
            "data_path": str(cfg.data.path),
            "data_hash": result.data_info.data_hash,
            "seed": cfg.seed,
            "config_hash": cfg.config_hash(),
            "code_version": code_version(),
            "run_dir": str(result.run_dir),
            "created": created,
            "extra": dict(extra_lineage or {}),
        }
        write_plots(result, tmp / "plots")

        def finish(folder: Path, version: int) -> None:
            # The version number is known only under the registry's lock: the files naming it last.
            lineage["version"] = version
            _write_json(folder / LINEAGE_FILE, lineage)
            (folder / MODEL_CARD_FILE).write_text(model_card(result, student, lineage, warnings), encoding="utf-8")

        try:
            return registry.commit(name, tmp, finish, job_id=job_id)
        except RegistryError as exc:
            raise PublishError(str(exc)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def list_published(registry_dir: Path) -> list[PublishedStudent]:
    """Every published version, sorted by name then version (temporary and foreign entries skipped)."""
    return Registry(registry_dir).entries()


def load_student(path: Path) -> LASTv2:
    """Rebuild a published student (eval mode) from its version folder (or its model.safetensors):
    ``LASTv2.from_pretrained`` with every failure as a :class:`PublishError` naming the file."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS_FILE else path
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / STUDENT_CONFIG_FILE).is_file():
        raise PublishError(f"{folder}: not a published student ({WEIGHTS_FILE} and {STUDENT_CONFIG_FILE} expected)")
    try:
        return LASTv2.from_pretrained(folder)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise PublishError(f"{folder}: cannot load the student ({type(exc).__name__}: {str(exc)[:300]})") from None
