"""Experiment benchmark: does the shuffled control catch an informative teacher, and what does
running children as an experiment cost over running them directly?

One synthetic NTU-format dataset and one real LMDB feature set whose vectors carry class
information (each clip: its class's random unit pattern + noise; ``tests/support/experiment.py``):

* ``shuffled_vs_joined_distill_loss``: final distillation loss (last epoch's mean) of the
  ``kd-shuffled`` arm over the ``kd`` arm, from the experiment's own report, same seed(s)
  (target >= 1.5: with the teacher permuted across clips the student cannot learn it);
* ``experiment_overhead``: wall time of :func:`lastkd.student.experiment.run_local` (3 arms x
  1 seed, short runs, report + plots included) over the sum of the same child configs trained
  directly with :func:`lastkd.student.training.train` in fresh folders (best of ``--reps`` each,
  after one untimed warm-up run that builds the parse cache; load on a shared machine only ever
  adds time).

Prints a human summary, then ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lastkd.student import training as engine  # noqa: E402
from lastkd.student.experiment import ExperimentConfig, expand, run_local  # noqa: E402
from tests.support.experiment import experiment_base, make_informative_data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, kd vs kd-shuffled only, 1 timing rep (~3 min on 2 CPU cores)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds for the distillation-loss ratio (default 1 quick, 3 full)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timing repetitions (default 1 quick, 2 full)")
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds or (1 if quick else 3)
    reps = args.reps or (1 if quick else 2)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="lastkd-bench-exp-") as tmp_name:
        tmp = Path(tmp_name)
        data = make_informative_data(tmp / "data")

        # 1. the shuffled control, through the experiment and its report
        arms = {"kd": {}, "kd-shuffled": {"distill": {"teacher_order": "shuffled"}}}
        if not quick:
            arms = {"ce": {"distill": {"alpha_start": 0.0, "alpha_end": 0.0}}, **arms}
        exp = ExperimentConfig.from_dict(
            {
                "name": "bench",
                "base": experiment_base(data),
                "arms": arms,
                "seeds": list(range(seeds)),
                "baseline": "kd" if quick else "ce",
            }
        )
        t0 = time.perf_counter()
        ratio_run = run_local(exp, tmp / "ratio", store_path=data.store_path)
        ratio_s = time.perf_counter() - t0
        report = ratio_run.report
        ratio = report["distill_loss_ratio"]["kd-shuffled/kd"]
        losses = {a: report["per_arm"][a]["final_distill_loss"]["mean"] for a in ("kd", "kd-shuffled")}

        # 2. the experiment's overhead over the same children run directly
        small = ExperimentConfig.from_dict(
            {
                "name": "overhead",
                "base": experiment_base(data, epochs=2, batch_size=4, max_steps_per_epoch=2),
                "seeds": [0],
            }
        )
        # untimed warm-up: the first run builds the skeleton parse cache, which must not count against
        # whichever side happens to go first
        first = expand(small)[0]
        engine.train(first.config, tmp / "warmup", store_path=None)
        exp_times, direct_times = [], []
        for rep in range(reps):
            t0 = time.perf_counter()
            direct = 0.0
            for child in expand(small):
                t1 = time.perf_counter()
                engine.train(
                    child.config,
                    tmp / f"direct{rep}" / child.key,
                    store_path=data.store_path if child.config.distill.enabled else None,
                )
                direct += time.perf_counter() - t1
            direct_times.append(direct)
            t0 = time.perf_counter()
            run_local(small, tmp / f"exp{rep}", store_path=data.store_path)
            exp_times.append(time.perf_counter() - t0)

    figures = {
        "shuffled_vs_joined_distill_loss": round(ratio, 3),
        "experiment_overhead": round(min(exp_times) / min(direct_times), 3),
        "distill_loss_kd": round(losses["kd"], 4),
        "distill_loss_kd_shuffled": round(losses["kd-shuffled"], 4),
        "seeds": seeds,
        "experiment_s": round(min(exp_times), 2),
        "direct_s": round(min(direct_times), 2),
    }
    print(
        f"{'quick' if quick else 'full'}: informative teacher, {seeds} seed(s); ratio experiment took {ratio_s:.0f} s"
    )
    print(
        f"final distillation loss kd {losses['kd']:.4f}, kd-shuffled {losses['kd-shuffled']:.4f}: "
        f"ratio {ratio:.2f} (target >= 1.5)"
    )
    print(
        f"3 arms x 1 seed: experiment {min(exp_times):.1f} s vs children run directly {min(direct_times):.1f} s "
        f"= {figures['experiment_overhead']:.3f}"
    )
    for line in report["summary"]:
        print(f"  {line}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
