"""``lastkd compare CONFIG.yaml``: distillation against its baseline, trained locally, paired report.

CONFIG.yaml is either a training config (the experiment is then its default comparison: arms
``ce`` = alpha 0, ``kd`` = the config's distillation, ``kd-shuffled`` = the same with teacher
vectors permuted across clips; seeds 0, 1, 2) or an experiment config::

    name: alpha-sweep
    base: {...a training config...}
    arms: {ce: {distill: {alpha_start: 0, alpha_end: 0}}, kd: {}, kd-hi: {distill.alpha_start: 0.9}}
    seeds: [0, 1, 2]

Paths resolve and are confined as for ``lastkd train``. Every (arm, seed) child trains in
``OUT/runs/<arm>-s<seed>`` (running the same command again resumes); the report goes to
``OUT/report.json``, ``OUT/report.md`` and ``OUT/plots/``. Exit 0 done, 2 bad input, 3 cancelled.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastkd.services.trainer.train_cli import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, tensorboard_line

if TYPE_CHECKING:
    from lastkd.services.settings import Settings


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd compare``."""
    parser = sub.add_parser(
        "compare",
        help="distillation against its baseline: arms x seeds, paired differences",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("config", metavar="CONFIG.yaml", type=Path, help="training or experiment config (YAML)")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (the baseline is always run)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1 (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: under the jobs dir)")
    parser.set_defaults(func=run)
    return parser


def _pct(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return "n/a"
    text = f"{100 * iv['mean']:+6.2f}"
    return text + (f" [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}]" if iv["lo"] is not None else " (1 seed)")


def print_paired(report: dict[str, Any]) -> None:
    """The paired differences against the baseline, then the verdicts in words (stdout)."""
    print(f"\npaired differences vs {report['baseline']} (points, 95% interval over seeds {report['seeds']}):")
    print(f"  {'arm':<16} {'top-1':<28} {'top-5':<28} final distill loss")
    for arm in report["arms"]:
        loss = report["per_arm"][arm]["final_distill_loss"]
        loss_txt = "n/a" if loss is None else f"{loss['mean']:.4f}"
        if arm == report["baseline"]:
            print(f"  {arm:<16} {'(baseline)':<28} {'':<28} {loss_txt}")
            continue
        p = report["paired"][arm]
        print(f"  {arm:<16} {_pct(p['top1']):<28} {_pct(p['top5']):<28} {loss_txt}")
    print()
    for line in report["summary"]:
        print(f"- {line}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``lastkd compare``; returns the exit code (0 ok, 2 bad input, 3 cancelled)."""
    from lastkd.datapaths import DataPathError
    from lastkd.student import training as engine
    from lastkd.student.config import ConfigError
    from lastkd.student.experiment import ExperimentConfig, ExperimentError, expand, run_local

    def fail(msg: str) -> int:
        print(f"lastkd compare: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        exp = ExperimentConfig.from_yaml(args.config)
        arms = None
        if args.arms is not None:
            arms = [a.strip() for a in args.arms.split(",") if a.strip()]
            if not arms:
                return fail("--arms: give at least one arm name")
        if arms is not None or args.seeds is not None:
            exp = exp.select(arms=arms, seeds=args.seeds)
    except (ConfigError, ExperimentError) as exc:
        return fail(str(exc))
    roots = settings.resolved_data_roots
    try:
        exp = exp.confined(roots)  # the same rule as `lastkd train` and POST /train
    except DataPathError as exc:
        return fail(str(exc))
    children = expand(exp)
    out = args.out or settings.resolved_jobs_dir / "experiments" / f"{exp.name}-{exp.config_hash()[:12]}"
    store = settings.resolved_store_path if any(c.config.distill.enabled for c in children) else None
    print(
        f"experiment {exp.name}: arms {', '.join(exp.arms)} x seeds {list(exp.seeds)} = {len(children)} runs",
        file=sys.stderr,
    )
    print(f"output: {out}", file=sys.stderr)
    from lastkd.student import tblog

    if tblog.available():  # one log folder per child; pointing TensorBoard at runs/ shows the arms side by side
        print(
            f"tensorboard logs: {out / 'runs'}/<arm>-s<seed>/{tblog.LOG_DIR_NAME}  "
            f"(view: tensorboard --logdir {out / 'runs'})",
            file=sys.stderr,
        )
    else:
        print(tensorboard_line(out), file=sys.stderr)

    cancel = {"flag": False}

    def on_sigint(signum: int, frame: Any) -> None:
        cancel["flag"] = True
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (embedded use)
        previous = None
    done = {"n": 0}

    def on_child(child: Any, result: Any) -> None:
        done["n"] += 1
        loss = result.history[-1].get("train_distill") if result.history and child.config.distill.enabled else None
        extra = "" if loss is None else f"  final distill loss {loss:.4f}"
        print(
            f"[{done['n']}/{len(children)}] {child.key}: val top-1 {100 * result.metrics['top1']:.2f}%  "
            f"top-5 {100 * result.metrics['top5']:.2f}%{extra}",
            file=sys.stderr,
        )

    try:
        local = run_local(
            exp,
            out,
            store_path=store,
            data_roots=roots,
            on_child=on_child,
            hooks_for=lambda child: engine.TrainHooks(should_cancel=lambda: cancel["flag"]),
        )
    except ExperimentError as exc:
        if cancel["flag"]:
            print(f"cancelled ({exc}); run the same command again to resume", file=sys.stderr)
            return EXIT_CANCELLED
        return fail(str(exc))
    except (engine.TrainError, ValueError, OSError) as exc:
        return fail(str(exc))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    print_paired(local.report)
    print(f"\nreport: {local.paths['markdown']}  (JSON {local.paths['json']}, plots in {out / 'plots'})")
    return EXIT_OK
