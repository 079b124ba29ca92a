"""``lastkd demo``: from nothing to a published student, through the real services.

1. Generate a small SYNTHETIC NTU-format dataset (``lastkd synth``: skeletons + rendered videos)
   under a data root, plus the real NTU sample next to the project
   (``../shared/data/ntu_sample``) when that folder exists; the real sample replaces its
   synthetic namesake.
2. Start the embedded stack (:class:`lastkd.services.stack.Stack`: teacher API, trainer API, one worker)
   in its own data folder (``<data dir>/demo``) with an explicitly RANDOM-INIT teacher, or use a
   running one (``--teacher-url`` / ``--trainer-url``).
3. Embed every clip through ``POST /embed`` (several uploads in flight, progress line).
4. Submit ``POST /train`` with distillation from the feature set the teacher answered with, and
   follow the job over server-sent events (polling if the stream breaks).
5. Print where the published checkpoint, its metrics and plots are, and a summary.

Re-running is idempotent where it can be: the dataset is reused when its parameters match, the
teacher answers already-seen clips from the store (``cached``); each run trains and publishes a
new version. ``--fresh`` starts from an empty demo folder.

This module is the command: its flags, the flow of the steps, the training job and the
comparison, and the summary. The other parts live beside it: the dataset in
:mod:`lastkd.services.demo_data`, the uploads to the teacher in :mod:`lastkd.services.demo_embed`,
the console and the wording of its output in :mod:`lastkd.services.demo_console`, and the one
error, :class:`~lastkd.services.demo_errors.DemoError`, in :mod:`lastkd.services.demo_errors`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from lastkd.schemas.trainer import Experiment, Job, JobEvent, JobState, JobSubmitted
from lastkd.services.client import ApiError, TrainerClient
from lastkd.services.demo_console import FINETUNED_NOTICE, NOTICE, REAL_USE, Console, accuracy_verdict, fmt_s, pct
from lastkd.services.demo_data import NTU60_CLASSES, NTU_NAME, DemoDataset, dataset_name, prepare_dataset, real_pairs
from lastkd.services.demo_embed import EmbedSummary, embed_clips, error_text
from lastkd.services.demo_errors import DemoError
from lastkd.services.demo_teacher import DEMO_TEACHER, FineTunedTeacher, finetune_demo_teacher, teacher_settings
from lastkd.services.settings import Settings

__all__ = [
    "DEMO_TEACHERS",
    "add_parser",
    "build_train_config",
    "follow_job",
    "run",
    "submit_job",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NTU_SAMPLE = PROJECT_ROOT.parent / "shared" / "data" / "ntu_sample"
# Teachers a CPU demo can afford; ViT-B is the real teacher's size.
DEMO_TEACHERS = ("videomae_v2_vit_b", "videomae_v2_vit_s", "videomae_v2_tiny")
DEMO_EPOCHS = 16  # one step per epoch at the whole-split batch; 10 steps ended at 80% val (bench/learning.py)
DEMO_MAX_BATCH = 32  # the demo's training split is ~15 samples: one batch per epoch
SYNTH_FRAMES = 120  # longest synthetic clip (4 s at 30 fps); the teacher samples 16 frames of it


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def xsub_train_count(dataset: DemoDataset) -> int:
    """How many of the dataset's samples fall on the training side of the NTU-60 xsub split."""
    from lastkd.ntu.splits import XSUB60_TRAIN_PERFORMERS

    names = [p.stem for p in dataset.skeletons.glob("*.skeleton")]
    return sum(1 for n in names if NTU_NAME.match(n) and int(n[9:12]) in XSUB60_TRAIN_PERFORMERS)


def build_train_config(
    dataset: DemoDataset,
    feature_set: str,
    *,
    name: str,
    epochs: int,
    num_frames: int = 16,
    batch_size: int = DEMO_MAX_BATCH,
    seed: int = 0,
    classes: int | None = None,
) -> dict[str, Any]:
    """The TrainConfig (as JSON) of the demo job: LAST v2 small on the demo skeletons (xsub),
    cosine distillation from ``feature_set`` with alpha 0.5 -> 0, a short AdamW run and a light
    robustness evaluation (one level per corruption kind).

    Sized for the data: the head has ``classes`` outputs (the synthetic classes; None = NTU-60's
    60), and the batch is the whole ~15-sample training split (at most ``batch_size``): a batch of
    4 with mostly empty second-body slots gives BatchNorm and the gradient too little to go on
    (measured: CE 1.1 after 60 steps at batch 4, ~0.5 = the smoothing floor after 30 at batch 15).
    Evaluation uses precise per-stream BatchNorm statistics (the engine's default)."""
    batch_size = max(1, min(batch_size, xsub_train_count(dataset)))
    data: dict[str, Any] = {
        "format": "ntu_raw",
        "path": str(dataset.skeletons.resolve()),
        "dataset": "ntu60",
        "split": "xsub",
        "num_frames": num_frames,
    }
    if classes is not None:
        data["classes"] = classes
    return {
        "name": name,
        "data": data,
        "variant": "small",
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 1},
        "distill": {
            "feature_set": feature_set,
            "alpha_start": 0.5,
            "alpha_end": 0.0,
            "schedule": "linear",
            "loss": "cosine",
        },
        "seed": seed,
        "workers": 0,
        "eval": {
            "label_map": str(dataset.label_map.resolve()),
            "jitter_stds": [0.05],
            "joint_drop_probs": [0.2],
            "frame_drop_probs": [],
        },
    }


def submit_job(
    trainer_url: str, config: dict[str, Any], *, token: str | None = None, key: str | None = None
) -> JobSubmitted:
    """``POST /train``; returns the job record. Retries carry the same Idempotency-Key, so a lost
    answer never creates a second job."""
    with TrainerClient(trainer_url, token=token, busy_timeout=30.0) as client:
        try:
            return client.submit(config, idempotency_key=key or f"demo-{uuid.uuid4().hex}")
        except ApiError as exc:
            raise DemoError(f"POST {trainer_url}/train refused the demo job: {exc.code}: {exc.message}") from None


def _progress_text(job: JobEvent) -> str:
    state = job.state
    p = job.progress or {}
    if state in ("PENDING", "QUEUED"):
        return "  training: queued, waiting for the worker"
    if not p:
        return f"  training: {state.value.lower()}, loading data"
    phase = p.get("phase")
    epoch, epochs = int(p.get("epoch", 0)) + 1, p.get("epochs", "?")
    if phase == "final_eval":
        return f"  training: epoch {epochs}/{epochs} done; final evaluation (metrics, robustness, plots)"
    if phase == "done":
        return "  training: publishing the student"
    losses = p.get("losses") or {}
    loss = losses.get("total", losses.get("loss"))
    parts = [f"  training: epoch {epoch}/{epochs}", f"step {p.get('step', 0)}/{p.get('steps_per_epoch', '?')}"]
    if loss is not None:
        parts.append(f"loss {float(loss):.3f}")
    if "alpha" in p:
        parts.append(f"alpha {float(p['alpha']):.2f}")
    if phase == "eval" and p.get("val"):
        parts.append(f"val top-1 {100 * float(p['val'].get('top1', 0)):.1f}%")
    if p.get("eta_s"):
        parts.append(f"ETA {fmt_s(p['eta_s'])}")
    return ", ".join(parts)


def follow_job(
    trainer_url: str,
    job_id: str,
    console: Console,
    *,
    token: str | None = None,
    alive: Callable[[], None] | None = None,
    timeout: float = 24 * 3600.0,
) -> Job:
    """Follow a job to a terminal state (events, then polling if the stream breaks); returns the
    final job record. ``alive`` (optional) is checked at every update and may raise to abort (the
    demo's own stack uses it to notice a dead component)."""

    def update(record: JobEvent) -> None:
        if alive is not None:
            alive()
        console.progress(_progress_text(record))

    with TrainerClient(trainer_url, token=token) as client:
        try:
            return client.follow(job_id, update, timeout=timeout)
        except ApiError as exc:
            raise DemoError(f"job {job_id}: {exc.code}: {exc.message}") from None


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def demo_settings(settings: Settings, out: Path, teacher_model: str, store_name: str = "features") -> Settings:
    """Settings of the demo's own stack: everything under ``out`` on the embedded defaults (no
    server), a random-init teacher, the configured ports when free (else free ones).

    The feature store is ``out/stores/<store_name>.lmdb``, one per demo dataset: clip ids are
    NTU sample names, so two demo datasets (other class counts, seeds) would otherwise claim the
    same ids for different videos."""
    from lastkd.services.stack import free_port, port_free

    def port(host: str, wanted: int) -> int:
        return wanted if port_free(wanted, host) else free_port(host)

    values = settings.model_dump()
    teacher_port = port(settings.teacher_host, settings.teacher_port)
    trainer_port = port(settings.trainer_host, settings.trainer_port)
    if trainer_port == teacher_port:
        trainer_port = free_port(settings.trainer_host)
    values.update(
        data_dir=out,
        store_path=out / "stores" / f"{store_name}.lmdb",
        registry_dir=None,
        jobs_dir=None,
        data_roots=[],
        broker_url=None,
        result_backend=None,
        teacher_model=teacher_model,
        teacher_weights=None,
        teacher_random_init=True,
        teacher_port=teacher_port,
        trainer_port=trainer_port,
    )
    return Settings(**values)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``lastkd demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="from nothing to a published student (synthetic data, random-init teacher)",
        description=(
            "Generate a small SYNTHETIC NTU-format dataset (plus the real NTU sample when "
            "../shared/data/ntu_sample exists), start the embedded stack with a RANDOM-INIT teacher, "
            "embed every clip through POST /embed, train a LAST v2 student with distillation through "
            "POST /train, and print where the published checkpoint, metrics and plots are."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="demo folder (default <LASTKD_DATA_DIR>/demo, i.e. var/demo)"
    )
    parser.add_argument("--classes", type=int, default=5, help="synthetic classes, 2..60 (default 5)")
    parser.add_argument(
        "--samples-per-class", type=int, default=6, help="synthetic samples per class, 4..200 (default 6)"
    )
    parser.add_argument(
        "--epochs", type=int, default=DEMO_EPOCHS, help=f"training epochs, 1..100 (default {DEMO_EPOCHS})"
    )
    parser.add_argument(
        "--student-frames", type=int, default=16, help="frames per skeleton sample fed to the student (default 16)"
    )
    parser.add_argument(
        "--teacher-model",
        choices=DEMO_TEACHERS,
        default=None,
        help="teacher size (default LASTKD_TEACHER_MODEL, i.e. videomae_v2_vit_b; "
        "videomae_v2_vit_s is ~4x faster on CPU)",
    )
    parser.add_argument(
        "--name", default="demo-student", help="registry name of the published student (default demo-student)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of training (default 0)")
    parser.add_argument(
        "--ntu-sample",
        type=Path,
        default=DEFAULT_NTU_SAMPLE,
        help=f"folder with real NTU samples to include (default {DEFAULT_NTU_SAMPLE}, used when present)",
    )
    parser.add_argument("--no-ntu-sample", action="store_true", help="synthetic data only")
    parser.add_argument("--concurrency", type=int, default=3, help="uploads in flight to POST /embed (default 3)")
    parser.add_argument("--teacher-url", default=None, help="use a running teacher API instead of starting the stack")
    parser.add_argument(
        "--trainer-url",
        default=None,
        help="use a running trainer API (with --teacher-url); data goes under its data roots",
    )
    parser.add_argument(
        "--keep-running", action="store_true", help="leave the demo's stack running after the summary (Ctrl-C stops it)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the demo folder first")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="then run distillation against its baseline on the same data (POST /experiments: arms ce and kd, "
        "paired by seed) and print the paired difference",
    )
    parser.add_argument(
        "--compare-seeds", type=int, default=2, help="seeds of the --compare experiment, 1..8 (default 2)"
    )
    parser.add_argument(
        "--finetune-teacher",
        action="store_true",
        help="first fine-tune the tiny teacher on the synthetic RGB train split (person crop) and embed with it, "
        "instead of a random-init teacher: the stored features then carry class information",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=100, help="epochs of --finetune-teacher, 1..1000 (default 100)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the stack's logs on the terminal (always in <out>/logs)"
    )
    parser.set_defaults(func=run)
    return parser


def _check_args(args: argparse.Namespace, settings: Settings) -> str | None:
    """The first problem with the flags, or None."""
    if not 2 <= args.classes <= NTU60_CLASSES:
        return f"--classes must be 2..{NTU60_CLASSES}, got {args.classes}"
    if not 4 <= args.samples_per_class <= 200:
        return (
            f"--samples-per-class must be 4..200 (4 reach both sides of the xsub split), got {args.samples_per_class}"
        )
    if not 1 <= args.epochs <= 100:
        return f"--epochs must be 1..100, got {args.epochs}"
    if not 4 <= args.student_frames <= 300:
        return f"--student-frames must be 4..300, got {args.student_frames}"
    if not 1 <= args.concurrency <= 32:
        return f"--concurrency must be 1..32, got {args.concurrency}"
    if not 0 <= args.seed < 2**31:
        return f"--seed must be 0..2**31-1, got {args.seed}"
    from lastkd.student.config import NAME_RE

    if not NAME_RE.match(args.name) or ".." in args.name:
        return f"--name {args.name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a letter or digit"
    if not 1 <= args.teacher_epochs <= 1000:
        return f"--teacher-epochs must be 1..1000, got {args.teacher_epochs}"
    if args.finetune_teacher and args.teacher_url is not None:
        return "--finetune-teacher starts the demo's own stack with the fine-tuned teacher: drop --teacher-url/--trainer-url"
    if not 1 <= args.compare_seeds <= 8 or args.seed + args.compare_seeds > 2**31 - 1:
        return f"--compare-seeds must be 1..8 (and --seed + --compare-seeds < 2**31), got {args.compare_seeds}"
    if args.compare and len(f"{args.name}-cmp-kd-s{args.seed + args.compare_seeds - 1}") > 64:
        return f"--name {args.name!r} is too long for --compare (its child students are <name>-cmp-<arm>-s<seed>)"
    if (args.teacher_url is None) != (args.trainer_url is None):
        return "--teacher-url and --trainer-url go together (a running stack), or neither (the demo starts its own)"
    for flag, url in (("--teacher-url", args.teacher_url), ("--trainer-url", args.trainer_url)):
        if url is not None and not re.match(r"^https?://[^\s/]+(:\d+)?/?$", url):
            return f"{flag} must look like http://host:port, got {url!r}"
    model = args.teacher_model or settings.teacher_model
    if args.teacher_url is None and model not in DEMO_TEACHERS:
        return f"LASTKD_TEACHER_MODEL={model!r} is too large for a CPU demo; use --teacher-model ({', '.join(DEMO_TEACHERS)})"
    out = args.out if args.out is not None else Path(settings.data_dir) / "demo"
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo; exit 0 with a published student, 1 when a step failed, 2 for bad flags."""
    problem = _check_args(args, settings)
    if problem:
        print(f"lastkd demo: {problem}", file=sys.stderr)
        return 2
    console = Console()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return _run(args, settings, console, stop)
    except DemoError as exc:
        console.line()
        console.line(f"lastkd demo: FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        console.line()
        console.line("lastkd demo: interrupted; the demo stack was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, settings: Settings, console: Console, stop: threading.Event) -> int:
    from lastkd.services.stack import Stack, StackError

    t0 = time.monotonic()
    external = args.teacher_url is not None
    out = (args.out if args.out is not None else Path(settings.data_dir) / "demo").resolve()
    model = args.teacher_model or settings.teacher_model
    console.line("=" * 78)
    console.line("lastkd demo: synthetic NTU-format data -> teacher embeddings -> distilled LAST v2 student")
    console.line(FINETUNED_NOTICE if args.finetune_teacher else NOTICE)
    if args.finetune_teacher:
        model = DEMO_TEACHER
    elif model != "videomae_v2_vit_b" and not external:
        console.line(f"Teacher size: {model} (not the ViT-B of real use) to keep the demo short on this machine.")
    console.line("=" * 78)

    if external:
        teacher_url, trainer_url = args.teacher_url.rstrip("/"), args.trainer_url.rstrip("/")
        model = _check_external_teacher(teacher_url, model)
    if args.fresh and out.exists() and not external:
        shutil.rmtree(out)
    sample_dir = None if args.no_ntu_sample else args.ntu_sample
    with_real = sample_dir is not None and sample_dir.is_dir() and bool(real_pairs(sample_dir))
    name = dataset_name(args.classes, args.samples_per_class, SYNTH_FRAMES, args.seed, with_real)
    run_settings = settings if external else demo_settings(settings, out, model, store_name=name)
    data_root = run_settings.resolved_data_roots[0]

    # 1. data
    t = time.monotonic()
    console.line(
        f"[1/4] data: {args.classes} synthetic classes x {args.samples_per_class} samples"
        + (" + the real NTU sample" if sample_dir is not None and sample_dir.is_dir() else "")
    )
    dataset = prepare_dataset(
        data_root,
        classes=args.classes,
        samples_per_class=args.samples_per_class,
        frames=SYNTH_FRAMES,
        seed=args.seed,
        ntu_sample=sample_dir,
    )
    console.line(
        f"  {'reused' if dataset.reused else 'wrote'} {len(dataset.clips)} clips in {dataset.root} "
        f"({fmt_s(time.monotonic() - t)}); real NTU samples: {', '.join(dataset.real_samples) or 'none'}"
    )
    timings = {"data": time.monotonic() - t}
    teacher_label = f"{model} RANDOM-INIT"
    tuned: FineTunedTeacher | None = None
    if args.finetune_teacher:
        console.line(f"[1+] fine-tuning the teacher ({DEMO_TEACHER}) on the RGB train split, person crop")
        tuned = finetune_demo_teacher(
            dataset, run_settings.resolved_registry_dir, out / "teacher-runs", args.teacher_epochs, args.seed, console
        )
        timings["teacher"] = tuned.seconds
        values = run_settings.model_dump()
        values.update(teacher_settings(tuned, dataset))
        run_settings = Settings(**values)
        teacher_label = f"{DEMO_TEACHER} fine-tuned here (val top-1 {pct(tuned.top1)})"

    # 2. stack
    stack: Stack | None = None
    token = run_settings.token()
    try:
        t = time.monotonic()
        if external:
            console.line(
                f"[2/4] using the running stack: teacher {teacher_url} ({model}, RANDOM-INIT), trainer {trainer_url}"
            )
        else:
            console.line(f"[2/4] starting the stack in {out} (teacher {teacher_label}; logs in {out / 'logs'})")
            stack = Stack(run_settings, echo=args.verbose, announce=args.verbose)
            try:
                stack.start(cancel=stop)
            except StackError as exc:
                raise DemoError(f"the stack did not start: {exc}") from None
            teacher_url, trainer_url = stack.teacher_url, stack.trainer_url
            console.line(f"  ready in {fmt_s(time.monotonic() - t)}: teacher {teacher_url}, trainer {trainer_url}")
        timings["stack"] = time.monotonic() - t

        # 3. embed
        t = time.monotonic()
        console.line(f"[3/4] embedding {len(dataset.clips)} clips through POST {teacher_url}/embed")
        summary = embed_clips(teacher_url, list(dataset.clips), console, token=token, concurrency=args.concurrency)
        _check_stack(stack)
        timings["embed"] = time.monotonic() - t

        # 4. train
        t = time.monotonic()
        config = build_train_config(
            dataset,
            summary.feature_set or "",
            name=args.name,
            epochs=args.epochs,
            num_frames=args.student_frames,
            seed=args.seed,
            classes=args.classes,
        )
        submitted = submit_job(trainer_url, config, token=token)
        console.line(
            f"[4/4] training job {submitted.job_id} submitted (POST {trainer_url}/train): LAST v2 small, "
            f"{args.epochs} epoch(s), distillation from {summary.feature_set}"
        )
        job = follow_job(trainer_url, submitted.job_id, console, token=token, alive=lambda: _check_stack(stack))
        timings["train"] = time.monotonic() - t
        if job.state is not JobState.COMPLETED:
            console.finish(f"  training: {job.state.value}")
            raise DemoError(
                f"job {job.job_id} ended {job.state.value}: {job.error or 'no error recorded'} "
                f"(GET {trainer_url}/jobs/{job.job_id})"
            )
        console.finish(f"  trained in {fmt_s(timings['train'])}")
        _summary(
            console,
            job,
            trainer_url,
            summary,
            dataset,
            timings,
            time.monotonic() - t0,
            teacher_label,
            args.classes,
            FINETUNED_NOTICE if tuned is not None else NOTICE,
        )
        if args.compare:
            t = time.monotonic()
            exp = compare_experiment(config, seeds=list(range(args.seed, args.seed + args.compare_seeds)))
            console.line(
                f"[+] distillation against its baseline: POST {trainer_url}/experiments, arms ce (alpha 0) and kd, "
                f"{args.compare_seeds} seed(s), {2 * args.compare_seeds} jobs"
            )
            done = run_comparison(trainer_url, exp, console, token=token, alive=lambda: _check_stack(stack))
            timings["compare"] = time.monotonic() - t
            cosines = None
            if not external:
                names = [clip.name[: -len("_rgb.avi")] for clip in dataset.clips]
                cosines = teacher_class_cosines(run_settings.resolved_store_path, summary.feature_set or "", names)
            _compare_summary(console, done, trainer_url, cosines, tuned)
        if args.keep_running and stack is not None:
            console.line(f"The stack keeps running: teacher {teacher_url}, trainer {trainer_url}. Ctrl-C stops it.")
            dead = stack.wait(stop)
            if dead is not None:
                raise DemoError(stack.death_message(dead))
        return 0
    finally:
        if stack is not None:
            stack.stop()


def compare_experiment(config: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The ``--compare`` experiment: the demo's training config as the base, arms ``ce`` (no
    distillation) and ``kd`` (the config's), paired by seed."""
    from lastkd.student.experiment import DEFAULT_ARMS

    return {
        "name": f"{config['name']}-cmp",
        "base": config,
        "arms": {"ce": DEFAULT_ARMS["ce"], "kd": {}},
        "seeds": seeds,
        "baseline": "ce",
    }


def run_comparison(
    trainer_url: str,
    experiment: dict[str, Any],
    console: Console,
    *,
    token: str | None = None,
    alive: Callable[[], None] | None = None,
    timeout: float = 24 * 3600.0,
) -> Experiment:
    """Submit the experiment and follow it to its end (events, then polling); its final record."""
    with TrainerClient(trainer_url, token=token, busy_timeout=30.0) as client:
        try:
            submitted = client.submit_experiment(experiment, idempotency_key=f"demo-{uuid.uuid4().hex}")
            console.line(f"  experiment {submitted.experiment_id}: {len(submitted.children)} child jobs queued")

            def update(exp: Experiment) -> None:
                if alive is not None:
                    alive()
                console.progress(f"  comparing: {exp.done}/{len(exp.children)} child jobs finished")

            record = client.follow_experiment(submitted.experiment_id, update, timeout=timeout)
            console.finish(f"  experiment {record.state.value.lower()}")
            return record
        except ApiError as exc:
            raise DemoError(f"the comparison failed: {exc.code}: {exc.message}") from None


def teacher_class_cosines(store_path: Path, feature_set: str, names: list[str]) -> tuple[float, float] | None:
    """Mean cosine between the teacher vectors of clips of the same class and of different classes
    (labels from the NTU names): how much class information the teacher's features carry. None
    when the store or the vectors cannot be read."""
    import numpy as np

    from lastkd.featurestore import FeatureStore
    from lastkd.ntu.skeleton import parse_sample_name

    try:
        store = FeatureStore(store_path, readonly=True)
        try:
            vectors, found = store.get_many(feature_set, names)
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - a diagnostic line, never a reason to fail the demo
        return None
    labels = np.array([parse_sample_name(n).label for n in names])[found]
    x = np.asarray(vectors, dtype=np.float64)[found]
    if len(x) < 3 or len(set(labels.tolist())) < 2:
        return None
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(x), dtype=bool)
    if not (same & off).any():
        return None
    return float(cos[same & off].mean()), float(cos[~same].mean())


def _compare_summary(
    console: Console,
    exp: Experiment,
    trainer_url: str,
    cosines: tuple[float, float] | None,
    tuned: FineTunedTeacher | None = None,
) -> None:
    console.line("Distillation against its baseline (paired by seed)")
    if exp.state is not JobState.COMPLETED or exp.report is None:
        raise DemoError(f"experiment {exp.experiment_id} ended {exp.state.value}: {exp.error or 'no report'}")
    report = exp.report
    for arm in report["arms"]:
        iv = report["per_arm"][arm]["top1"]
        console.line(f"  {arm:<3} val top-1 {pct(iv.get('mean'))} over {iv.get('n')} seed(s)")
    for sentence in report.get("summary", []):
        console.line(f"  {sentence}")
    if cosines is not None and tuned is not None:
        within, between = cosines
        console.line(
            f"  the teacher was fine-tuned here (its own val top-1 {pct(tuned.top1)}, chance {pct(tuned.chance)}): "
            f"mean cosine of its features {within:.4f} within a class vs {between:.4f} between classes"
        )
    elif cosines is not None:
        within, between = cosines
        console.line(
            f"  the teacher is RANDOM-INIT: its features carry no class information (on this data: mean cosine "
            f"{within:.4f} within a class vs {between:.4f} between classes), so kd cannot beat ce here; "
            "with real weights this is the comparison that shows what distillation adds"
        )
    console.line(f"  report: {exp.report_dir}/report.md (GET {trainer_url}/experiments/{exp.experiment_id})")


def _check_external_teacher(teacher_url: str, model: str) -> str:
    """The model name of a running teacher, after checking that it is ready and random-init.

    Demo clips carry NTU sample names, so they must never enter a feature set made with real
    weights (they would shadow the real clips of the same names): such a teacher is refused
    before anything is written.
    """
    try:
        response = httpx.get(f"{teacher_url}/health/ready", timeout=10.0)
    except httpx.HTTPError as exc:
        raise DemoError(f"the teacher at {teacher_url} does not answer ({exc})") from None
    if response.status_code != 200:
        raise DemoError(f"the teacher at {teacher_url} is not ready: {error_text(response)}")
    try:
        info = response.json()
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise DemoError(f"{teacher_url}/health/ready did not answer a JSON object; is it a lastkd teacher?")
    if info.get("random_init") is not True:
        raise DemoError(
            f"the teacher at {teacher_url} runs with real weights; the demo writes SYNTHETIC clips under NTU "
            "sample names and refuses to mix them into a real feature set. Point it at a random-init teacher "
            "(LASTKD_TEACHER_RANDOM_INIT=true, no weights) or let the demo start its own stack."
        )
    return str(info.get("model", model))


def _check_stack(stack: Any) -> None:
    if stack is not None:
        from lastkd.services.stack import StackError

        try:
            stack.check()
        except StackError as exc:
            raise DemoError(f"a component of the demo stack stopped: {exc}") from None


def _summary(
    console: Console,
    job: Job,
    trainer_url: str,
    emb: EmbedSummary,
    dataset: DemoDataset,
    timings: dict[str, float],
    total: float,
    teacher: str,
    classes: int,
    notice: str = NOTICE,
) -> None:
    result = job.result or {}
    metrics = job.metrics or {}
    folder = Path(result.get("path", ""))
    plots = sorted(p.name for p in (folder / "plots").glob("*.png")) if folder.is_dir() else []
    console.line("=" * 78)
    console.line(f"Published student: {result.get('name')} v{result.get('version')}")
    console.line(f"  folder      {folder}")
    console.line(
        f"  weights     {folder / 'model.safetensors'}  (LASTv2.from_pretrained(folder): strict, Hugging Face layout)"
    )
    console.line(f"  metrics     {folder / 'metrics.json'}")
    console.line(f"  plots       {folder / 'plots'}/ ({', '.join(plots) or 'none found'})")
    console.line(f"  model card  {folder / 'README.md'}")
    console.line(f"  over HTTP   {trainer_url}/checkpoints/{result.get('name')}/v{result.get('version')}")
    console.line("Summary")
    console.line(
        f"  val top-1 {pct(metrics.get('top1'))}, top-5 {pct(metrics.get('top5'))}: "
        + accuracy_verdict(metrics.get("top1"), metrics.get("num_samples"), classes)
    )
    console.line(
        f"  ({classes} synthetic classes, chance {100 / classes:.0f}%; they are separable, and the demo "
        "recipe reaches >= 90% val top-1 on the default 5-class set: bench/learning.py)"
    )
    history = (job.history or [{}])[-1] or {}
    if metrics.get("ce_floor") is not None:
        console.line(
            f"  CE floor with label smoothing over {classes} classes: {float(metrics['ce_floor']):.3f}"
            + (f"; final train CE {float(history['train_ce']):.3f}" if "train_ce" in history else "")
        )
    console.line(
        f"  teacher feature coverage: train {pct(metrics.get('coverage_train'))}, val {pct(metrics.get('coverage_val'))}"
    )
    console.line(
        f"  clips: {len(dataset.clips)} ({emb.embedded} embedded, {emb.cached} cached, {len(emb.failed)} failed), "
        f"teacher {teacher}, feature set {emb.feature_set}"
    )
    console.line("  time: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in timings.items()) + f"; total {fmt_s(total)}")
    console.line(notice)
    console.line(REAL_USE)
    console.line("=" * 78)
