"""The model card of a published student: ``README.md`` with YAML front matter (library, tags,
headline metrics) and a Markdown summary of the model, data, training, metrics and lineage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from lastkd.jsonsafe import to_jsonable
from lastkd.models.last_v2 import STUDENT_FORMAT

if TYPE_CHECKING:  # annotations only: writing the card needs neither the loop nor the data code
    from lastkd.student.data.dataset import DataInfo
    from lastkd.student.training import TrainResult

__all__ = ["model_card"]


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
        yaml.safe_dump(to_jsonable(front), sort_keys=False).rstrip(),
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
