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

The card, the figures and the recorded facts (FLOPs, code version, synthetic data) are written by
:mod:`lastkd.student.card`, :mod:`lastkd.student.plots` and :mod:`lastkd.student.provenance`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file

from lastkd.ids import check_job_id
from lastkd.jsonsafe import to_jsonable
from lastkd.models.last_v2 import (
    STREAM_BN_FILE,
    STUDENT_CONFIG_FILE,
    STUDENT_FORMAT,
    WEIGHTS_FILE,
    LASTv2,
    num_parameters,
)
from lastkd.registry import LINEAGE_FILE, METRICS_FILE, PublishedStudent, Registry, RegistryError
from lastkd.student.card import model_card
from lastkd.student.plots import write_plots
from lastkd.student.provenance import code_version, estimate_flops, is_synthetic
from lastkd.student.training import RunState, TrainResult

# publish() and load_student(), and the pieces callers reach through this module (``pub.estimate_flops``)
__all__ = [
    "MODEL_CARD_FILE",
    "TRAIN_CONFIG_FILE",
    "PublishError",
    "estimate_flops",
    "list_published",
    "load_student",
    "publish",
]

MODEL_CARD_FILE = "README.md"
TRAIN_CONFIG_FILE = "train_config.yaml"


class PublishError(ValueError):
    """A result that cannot be published, or a registry entry that cannot be read."""


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")


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
        if is_synthetic(cfg.data.path):
            warnings.append("trained and evaluated on SYNTHETIC skeletons; the metrics say nothing about NTU RGB+D.")
        if feature_set and "random-init" in feature_set:
            warnings.append("distilled from a RANDOM-INIT teacher (no official weights); the teacher signal is noise.")
        lineage = {
            "name": name,
            "job_id": job_id,
            "feature_set": feature_set,
            "teacher_random_init": bool(feature_set and "random-init" in feature_set),
            "synthetic_data": is_synthetic(cfg.data.path),
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
