"""``lastkd finetune-teacher CONFIG.yaml``: fine-tune the VideoMAE V2 teacher and publish it.

Data paths follow the data-root rule of every job (``LASTKD_DATA_ROOTS``; relative paths from the
first root). The run folder defaults to ``<jobs_dir>/finetune/<name>-<config hash>``, so the same
command resumes an interrupted run from its last epoch. The teacher is published to
``<registry>/_teachers/<name>-<sha256[:12]>/`` (``teacher.pth`` in the official layout and
``lineage.json``), named by its own sha256: publishing the same weights twice is one folder.
Ctrl-C stops before the next step and keeps the last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lastkd.services.settings import Settings

EXIT_OK, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 2, 3


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd finetune-teacher``."""
    parser = sub.add_parser(
        "finetune-teacher",
        help="fine-tune the VideoMAE V2 teacher on RGB clips and publish it",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", type=Path, help="fine-tuning config (YAML)")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoint folder (default: under the jobs dir)")
    parser.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``lastkd finetune-teacher``; 0 ok, 2 bad input, 3 cancelled."""
    from lastkd.datapaths import DataPathError
    from lastkd.devices import DeviceError
    from lastkd.finetune.config import FinetuneConfig, FinetuneConfigError
    from lastkd.finetune.loop import FinetuneError, FinetuneHooks, FinetuneState, finetune, publish_to_registry
    from lastkd.teacher.video import VideoError

    def fail(msg: str) -> int:
        print(f"lastkd finetune-teacher: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        config = FinetuneConfig.from_yaml(args.config).confined(settings.resolved_data_roots)
    except (FinetuneConfigError, DataPathError) as exc:
        return fail(str(exc))
    run_dir = args.run_dir or settings.resolved_jobs_dir / "finetune" / f"{config.name}-{config.config_hash()[:12]}"
    print(f"run directory: {run_dir}", file=sys.stderr)
    stop = {"flag": False}

    def on_sigint(signum: int, frame: object) -> None:
        stop["flag"] = True
        print("stopping before the next step (the last epoch checkpoint is kept) ...", file=sys.stderr)

    def on_epoch(entry: dict) -> None:
        val = f", val top-1 {100 * entry['val_top1']:.1f}%" if "val_top1" in entry else ""
        print(f"epoch {entry['epoch']}/{config.epochs}: loss {entry['train_loss']:.4f}{val}", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = finetune(
            config,
            run_dir,
            FinetuneHooks(on_epoch=on_epoch, should_cancel=lambda: stop["flag"]),
            roots=settings.resolved_data_roots,
        )
    except (FinetuneConfigError, FinetuneError, DataPathError, DeviceError, VideoError) as exc:
        return fail(str(exc))
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.state is FinetuneState.CANCELLED:
        print(f"cancelled after {result.epochs_completed} epoch(s); run again to resume", file=sys.stderr)
        return EXIT_CANCELLED
    m = result.metrics
    print(
        f"val top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}% "
        f"({m['clips']} clips x {m['views']} views; chance {100 / result.num_classes:.1f}%)"
    )
    if args.no_publish:
        return EXIT_OK
    out = publish_to_registry(result, settings.resolved_registry_dir)
    print(f"published: {out}")
    print(f"embed with it: LASTKD_TEACHER_NAME={out.name} (LASTKD_TEACHER_MODEL={config.model})")
    return EXIT_OK
