"""``lastkd train CONFIG.yaml``: train a student in the foreground and publish it.

Relative paths in the config are taken relative to the first configured data root
(``LASTKD_DATA_ROOTS``, default ``<data_dir>/datasets``), ``~`` is expanded, and every data path
(and every data file read through a symlink) must lie inside the data roots: the same rule
(``lastkd.datapaths.confine``) as ``POST /train`` and the worker. The feature store and the checkpoint registry come from the settings. The run
directory defaults to ``<jobs_dir>/cli/<name>-<config hash>``, so running the same command again
resumes an interrupted run (or just re-publishes a finished one, which is idempotent).
Ctrl-C stops at the next step and keeps the last epoch checkpoint. ``--ddp N`` runs the same
training on N processes through torchrun (one per GPU, or gloo on CPU).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lastkd.services.settings import Settings

EXIT_OK, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 2, 3


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd train``."""
    parser = sub.add_parser(
        "train",
        help="train a LAST v2 student from a YAML config and publish it",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", type=Path, help="training config (YAML)")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoint folder (default: under the jobs dir)")
    parser.add_argument("--ddp", type=int, default=1, metavar="N", help="processes for DDP via torchrun (default 1)")
    parser.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    parser.add_argument("--job-id", default=None, help="id recorded in the lineage (publishing is idempotent per id)")
    parser.set_defaults(func=run)
    return parser


def _progress_bar() -> tuple[Any, Any]:
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def on_progress(p: Any) -> None:
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(
                total=p.epochs * p.steps_per_epoch, unit="step", file=sys.stderr, dynamic_ncols=True
            )
            bar.update(p.epoch * p.steps_per_epoch + max(p.step - 1, 0))
        if p.phase == "train":
            bar.update(1)
            bar.set_description(f"epoch {p.epoch + 1}/{p.epochs}")
            bar.set_postfix(
                loss=f"{p.losses.get('total', 0):.3f}", alpha=f"{p.alpha:.2f}", sps=f"{p.samples_per_s:.0f}"
            )
        elif p.phase == "eval" and p.val:
            bar.write(
                f"epoch {p.epoch + 1}/{p.epochs}: val top-1 {100 * p.val['top1']:.2f}%  top-5 {100 * p.val['top5']:.2f}%"
            )
        elif p.phase == "final_eval":
            bar.set_description("final evaluation")
        elif p.phase == "done":
            bar.close()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return on_progress, close


def tensorboard_line(run_dir: Path) -> str:
    """Where the run's TensorBoard logs go, or how to get them (shared with ``lastkd compare``)."""
    from lastkd.student import tblog

    if tblog.available():
        return f"tensorboard logs: {tblog.log_dir(run_dir)}  (view: tensorboard --logdir {run_dir})"
    return f"tensorboard logs: off (the tensorboard package is not installed: {tblog.INSTALL_HINT})"


def _run_ddp(config_path: Path, run_dir: Path, nproc: int, store: Path | None, roots: list[Path]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "lastkd.student.training",
        "--config",
        str(config_path),
        "--run-dir",
        str(run_dir),
    ]
    if store is not None:
        cmd += ["--store", str(store)]
    for root in roots:
        cmd += ["--data-root", str(root)]
    return subprocess.run(cmd, check=False).returncode


def _print_skipped(report: dict[str, Any]) -> None:
    """Say which source files the readers skipped (they are not in the training data)."""
    if not report["count"]:
        return
    shown = len(report["first"])
    head = f"the first {shown}" if shown < report["count"] else "all"
    print(f"warning: {report['count']} unusable data file(s)/sample(s) were skipped ({head} below):", file=sys.stderr)
    for reason in report["first"]:
        print(f"  {reason}", file=sys.stderr)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``lastkd train``; returns the process exit code (0 ok, 2 bad input, 3 cancelled)."""
    from lastkd.datapaths import DataPathError
    from lastkd.student import training as engine
    from lastkd.student.config import ConfigError, TrainConfig
    from lastkd.student.paths import confine_config_paths
    from lastkd.student.publish import PublishError, publish

    def fail(msg: str) -> int:
        print(f"lastkd train: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        config = TrainConfig.from_yaml(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    if not 1 <= args.ddp <= 1024:
        return fail(f"--ddp must be between 1 and 1024, got {args.ddp}")
    roots = settings.resolved_data_roots
    try:
        # the same rule as POST /train and the worker (lastkd.datapaths.confine)
        config = confine_config_paths(config, roots)
    except DataPathError as exc:
        return fail(str(exc))
    run_dir = args.run_dir or settings.resolved_jobs_dir / "cli" / f"{config.name}-{config.config_hash()[:12]}"
    store = settings.resolved_store_path if config.distill.enabled else None
    print(f"run directory: {run_dir}", file=sys.stderr)
    print(tensorboard_line(run_dir), file=sys.stderr)

    try:
        if args.ddp > 1:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = run_dir / "config.yaml"
            resolved.write_text(config.to_yaml(), encoding="utf-8")
            rc = _run_ddp(resolved, run_dir, args.ddp, store, roots)
            if rc == EXIT_CANCELLED:
                print("cancelled; run the same command again to resume", file=sys.stderr)
                return EXIT_CANCELLED
            if rc != 0:
                return fail(f"torchrun exited with status {rc}")
            result = engine.load_result(run_dir)
        else:
            cancel = {"flag": False}

            def on_sigint(signum: int, frame: Any) -> None:
                cancel["flag"] = True
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

            try:
                previous = signal.signal(signal.SIGINT, on_sigint)
            except ValueError:  # not the main thread (embedded use): no Ctrl-C handling
                previous = None
            on_progress, close_bar = _progress_bar()
            try:
                result = engine.train(
                    config,
                    run_dir,
                    store_path=store,
                    data_roots=roots,
                    hooks=engine.TrainHooks(on_progress=on_progress, should_cancel=lambda: cancel["flag"]),
                )
            finally:
                close_bar()
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
    except (engine.TrainError, ValueError, OSError) as exc:
        return fail(str(exc))
    if result.state is engine.RunState.CANCELLED:
        _print_skipped(result.data_info.data_skipped())
        print(
            f"cancelled after {result.epochs_completed} epoch(s); run the same command again to resume", file=sys.stderr
        )
        return EXIT_CANCELLED
    m = result.metrics
    print(f"val top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  ({m['num_samples']} clips)")
    _print_skipped(result.data_info.data_skipped())
    if args.no_publish:
        print(f"not published; result in {run_dir / engine.RESULT_NAME}")
        return EXIT_OK
    try:
        published = publish(
            result,
            settings.resolved_registry_dir,
            job_id=args.job_id or f"cli-{Path(run_dir).name}",
            extra_lineage={"launched_by": "lastkd train", "ddp_processes": args.ddp},
        )
    except PublishError as exc:
        return fail(str(exc))
    print(f"published {published.name} v{published.version} at {published.path}")
    return EXIT_OK
