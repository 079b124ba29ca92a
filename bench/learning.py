"""Learning benchmark: does a short run of the demo recipe learn its separable synthetic classes?

Builds the demo's synthetic dataset (``lastkd.student.synth.generate``: 5 classes x 6 samples,
clips up to 120 frames, skeletons only) in a temp dir, takes the demo's training config
(``lastkd.services.demo.build_train_config``: LAST v2 small, head sized for the data, the whole
~15-sample training split as one batch, AdamW, per-stream precise BatchNorm statistics for eval)
and trains it directly through the engine (:func:`lastkd.student.training.train`) with plain CE
(no teacher: the demo's teacher is random-init, and the stack is not what is measured here).

* ``demo_val_top1``: final val top-1 of that run (target >= 0.9; chance 0.2).
* ``steps_to_90``: optimiser steps until the end-of-epoch val top-1 first reaches 0.9 (null when
  it never does).
* ``shuffled_vs_joined_distill_loss`` / ``experiment_overhead``: null here; ``bench/experiment.py``
  measures them (an informative teacher and a ``kd-shuffled`` arm).

``--quick`` (the default recipe, one seed) takes about a minute on an idle 2-core machine;
``--seeds N`` repeats the run with seeds 0..N-1 and reports the mean (and every value).
Prints a human summary, then ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def steps_to(history: list[dict[str, Any]], steps_per_epoch: int, level: float = 0.9) -> int | None:
    """Optimiser steps until the end-of-epoch val top-1 first reaches ``level`` (None: never)."""
    for h in history:
        if h.get("val_top1", 0.0) >= level:
            return int(h["epoch"]) * steps_per_epoch
    return None


def run_once(root: Path, seed: int, classes: int, samples_per_class: int, epochs: int) -> dict[str, Any]:
    """Train the demo recipe once on the demo data; return its numbers."""
    from lastkd.services.demo import build_train_config
    from lastkd.services.demo_data import prepare_dataset
    from lastkd.student import training as engine
    from lastkd.student.config import TrainConfig

    dataset = prepare_dataset(root / "data", classes=classes, samples_per_class=samples_per_class, frames=120, seed=0)
    raw = build_train_config(dataset, "", name="bench-learning", epochs=epochs, seed=seed, classes=classes)
    raw.pop("distill")  # CE only: no teacher in this benchmark
    raw["device"] = "cpu"
    raw["eval"] = {**raw["eval"], "jitter_stds": [], "joint_drop_probs": []}
    cfg = TrainConfig.from_dict(raw)
    t0 = time.perf_counter()
    result = engine.train(cfg, root / f"run-{seed}")
    wall = time.perf_counter() - t0
    steps_per_epoch = max(1, result.data_info.train_size // cfg.batch_size)
    return {
        "seed": seed,
        "val_top1": result.metrics["top1"],
        "steps_to_90": steps_to(result.history, steps_per_epoch),
        "train_ce_final": result.history[-1].get("train_ce"),
        "ce_floor": result.metrics.get("ce_floor"),
        "val_top1_per_epoch": [round(h["val_top1"], 3) for h in result.history],
        "batch_size": cfg.batch_size,
        "steps": epochs * steps_per_epoch,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed of the demo recipe (the default)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the demo's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: two threads on a loaded 2-core machine stall in OpenMP)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seeds <= 20:
        parser.error("--seeds must be 1..20")
    from lastkd.services.demo import DEMO_EPOCHS

    epochs = args.epochs or DEMO_EPOCHS
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lastkd-bench-learning-") as tmp:
        for seed in range(args.seeds):
            r = run_once(Path(tmp), seed, classes=5, samples_per_class=6, epochs=epochs)
            runs.append(r)
            print(
                f"seed {seed}: val top-1 {r['val_top1']:.3f} after {r['steps']} steps of batch {r['batch_size']} "
                f"(per epoch {r['val_top1_per_epoch']}), steps to 90% {r['steps_to_90']}, "
                f"train CE {r['train_ce_final']:.3f} (floor {r['ce_floor']:.3f}), {r['wall_s']:.1f}s"
            )
    reached = [r["steps_to_90"] for r in runs if r["steps_to_90"] is not None]
    figures = {
        "demo_val_top1": statistics.fmean(r["val_top1"] for r in runs),
        "steps_to_90": max(reached) if len(reached) == len(runs) else None,
        "shuffled_vs_joined_distill_loss": None,  # issue 10 section 2 (experiments) not built
        "experiment_overhead": None,  # issue 10 section 2 (experiments) not built
        "val_top1_per_seed": [r["val_top1"] for r in runs],
        "epochs": epochs,
        "wall_s": sum(r["wall_s"] for r in runs),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
