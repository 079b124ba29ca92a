"""The training loop of the LAST v2 student: plain Python, CPU or CUDA, DDP via torchrun, resumable.

``train(config, run_dir)`` builds the data, the student and (when distilling) the projector,
trains for ``config.epochs`` epochs and evaluates. After every epoch the complete training
state goes to ``run_dir/last.pt`` (written atomically); calling ``train`` again on the same
``run_dir`` resumes from it, and the result of a finished run is kept in ``run_dir/result.pt``
(the files: :mod:`lastkd.student.checkpoints`).

Determinism. The shuffle order of an epoch and the DataLoader worker seeds are functions of
(seed, epoch) alone and augmentation is a function of (seed, epoch, index) (see the Dataset), and
the torch/numpy/python RNG states are checkpointed at the epoch boundary (:mod:`lastkd.student.rng`),
so on CPU a run that is interrupted and resumed ends with the same weights, bit for bit, as one
that was not.

DDP. Run ``torchrun --nproc_per_node N -m lastkd.student.training --config C --run-dir D``.
``batch_size`` is the global batch: each of the N ranks takes its 1/N slice of the *same* global
batch a single process would draw (:class:`lastkd.student.sampler.GlobalBatchSampler`), and DDP
averages the gradients, so a DDP run follows the single-process run up to BatchNorm statistics
(per rank, over B/N samples, not synchronised) and floating-point reduction order. The projector
is kept out of DDP: it is not used on steps where alpha is 0 or on batches without teacher
features, which DDP's reducer cannot express, so its gradients are averaged by an explicit
all-reduce (the collectives: :mod:`lastkd.student.ddp`). Rank 0 alone writes checkpoints, metrics
and results.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lastkd.datapaths import confine
from lastkd.devices import DeviceError, resolve_device
from lastkd.models.last_v2 import STREAM_ORDER, LASTv2, create_last_v2
from lastkd.student import distill as kd
from lastkd.student import evaluate as ev
from lastkd.student import tblog
from lastkd.student.bn_stats import recompute_bn_stats
from lastkd.student.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    RESULT_NAME,
    atomic_torch_save,
    check_config_hash,
    load_checkpoint_file,
)
from lastkd.student.config import TrainConfig
from lastkd.student.data import streams as data_streams
from lastkd.student.data.dataset import DataInfo, SkeletonDataset, build_datasets
from lastkd.student.data.sources import load_splits
from lastkd.student.ddp import (
    allreduce_mean_grads,
    any_rank,
    broadcast_module,
    dist_info,
    gather,
    init_process_group_from_env,
)
from lastkd.student.errors import ResumeError, TrainError
from lastkd.student.rng import mix_seed, rng_state, seed_everything, seed_worker, set_rng_state
from lastkd.student.sampler import GlobalBatchSampler

# The loop's own names, and those of its pieces that callers reach through this module
# (``engine.TrainError``, ``engine.GlobalBatchSampler``, ``engine.load_checkpoint_file``, ...).
__all__ = [
    "CHECKPOINT_NAME",
    "RESULT_NAME",
    "GlobalBatchSampler",
    "Progress",
    "ResumeError",
    "RunState",
    "TrainError",
    "TrainHooks",
    "TrainResult",
    "TrainingRun",
    "load_checkpoint_file",
    "load_result",
    "lr_factor_fn",
    "main",
    "save_result",
    "train",
]

log = logging.getLogger(__name__)


class RunState(str, enum.Enum):
    """How a run ended: all epochs and the final evaluation, or stopped by ``should_cancel``."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"


SYNC_EVERY_STEPS = 20  # on a GPU: steps between host syncs of the losses (progress, divergence check)


@dataclass
class Progress:
    """A snapshot for progress reporting; ``phase`` is train, eval (epoch end), final_eval or done."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    losses: dict[str, float]
    alpha: float
    samples_per_s: float
    eta_s: float
    phase: str
    lr: float = 0.0
    val: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain values (for job records and events)."""
        return asdict(self)


@dataclass
class TrainHooks:
    """Callbacks from the loop: progress at every loss sync (each step on the CPU, every
    :data:`SYNC_EVERY_STEPS` on a GPU) and at each epoch end; cancellation checked every step
    (at the syncs under DDP)."""

    on_progress: Callable[[Progress], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    """What a run produced. ``model_state`` is the student only (no projector), on CPU."""

    state: RunState
    model_state: dict[str, Tensor]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: TrainConfig
    data_info: DataInfo
    run_dir: Path
    epochs_completed: int
    class_names: list[str] = field(default_factory=list)
    # per-stream eval statistics of the backbone BatchNorms (LASTv2.stream_bn_stats); {} = none
    stream_bn: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# model pieces
# --------------------------------------------------------------------------------------------
class _WithFeatures(nn.Module):
    """Routes ``forward`` to ``forward_with_features`` so DDP sees one forward per step."""

    def __init__(self, model: LASTv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, streams: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.model.forward_with_features(streams)


def lr_factor_fn(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier of the base learning rate: linear warmup, then cosine/step/constant."""
    sch, base = config.schedule, config.optimizer.lr
    total = config.epochs * steps_per_epoch
    warm = int(round(sch.warmup_epochs * steps_per_epoch))
    floor = min(sch.min_lr / base, 1.0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if sch.kind == "constant":
            return 1.0
        if sch.kind == "cosine":
            p = min((step - warm) / max(1, total - warm), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        epoch = step / steps_per_epoch
        return max(sch.gamma ** sum(1 for m in sch.milestones if epoch >= m), floor)

    return factor


def _build_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay
        )
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> str | None:
    """Restore a checkpoint's GradScaler state where it applies; else what was not restored.

    A scaler is enabled only for fp16 on CUDA: a run started on the CPU (or in bf16) saves an
    empty state, which an enabled scaler refuses to load, and an enabled run's state means nothing
    to a disabled scaler. Either way the scale starts afresh, which costs a few skipped steps.
    """
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
        return None
    if scaler.is_enabled():
        return "the fp16 loss scale (the checkpoint was written without one): it starts afresh"
    if state:
        return "the fp16 loss scale (this run does not scale its loss: CPU or bf16)"
    return None


class TrainingRun:
    """State of one call to :func:`train` (kept in one object so the loop reads linearly).

    :func:`train` is the entry point; the object is public so that benchmarks can time the very
    same step (``build()`` then ``train_step(batch, global_step)`` on batches of ``train_loader``).
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        store_path: Path | None,
        hooks: TrainHooks,
        data_roots: list[Path] | None,
    ) -> None:
        self.config, self.run_dir, self.hooks = config, Path(run_dir), hooks
        self.data_roots = data_roots
        self.di = dist_info()
        try:
            self.device = resolve_device(config.device, local_rank=self.di.local_rank, distributed=self.di.active)
        except DeviceError as exc:
            raise TrainError(str(exc)) from None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp) if self.device.type == "cuda" else None
        )
        if config.amp != "none" and self.amp_dtype is None:
            log.warning("amp=%s ignored: training on %s (autocast is CUDA only)", config.amp, self.device)
        self.distilling = bool(config.distill.enabled)
        if self.distilling and store_path is None:
            raise TrainError(f"distillation with feature set {config.distill.feature_set!r} needs a feature store path")
        self.store_path = store_path if self.distilling else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of ``config.amp`` on CUDA, else a no-op context."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # -- setup -------------------------------------------------------------------------------
    def build(self) -> None:
        """Data, loaders, student, projector, optimizer, schedule and (DDP) wrapper, from the config."""
        cfg, di = self.config, self.di
        seed_everything(cfg.seed)
        # Rank 0 first: it may build the parse cache the others then reuse.
        if di.active and not di.is_main:
            dist.barrier()
        train_col, val_col = load_splits(cfg.data, self.data_roots)
        self.train_ds, self.val_ds, self.info = build_datasets(
            cfg.data,
            train_col,
            val_col,
            teacher_store_path=self.store_path,
            feature_set=cfg.distill.feature_set if self.distilling else None,
            seed=cfg.seed,
            teacher_order=cfg.distill.teacher_order,
            flipped_views=cfg.distill.flipped_views,
        )
        if di.active and di.is_main:
            dist.barrier()
        if self.info.skipped and di.is_main:
            log.warning(
                "%d data file(s)/sample(s) skipped as unusable; first: %s",
                self.info.skipped,
                "; ".join(self.info.skipped_first),
            )
        if self.distilling and self.info.coverage_train == 0.0:
            raise TrainError(
                f"feature set {cfg.distill.feature_set!r} covers none of the {self.info.train_size} training samples"
            )
        label_map = cfg.eval.label_map
        if label_map is not None and self.data_roots is not None:  # what is read is confined, like the data
            label_map = confine(label_map, self.data_roots, field="eval.label_map", must_exist=True)
        self.names = ev.class_names(self.info.num_classes, label_map)

        self.model = create_last_v2(cfg.variant, num_classes=self.info.num_classes).to(self.device)
        self.projector: nn.Module | None = None
        self.stats: kd.FeatureStats | None = None
        if self.distilling:
            self.projector = kd.Projector(
                self.model.feature_dim, self.info.feature_dim, cfg.distill.projector_hidden
            ).to(self.device)
            teacher = self.train_ds.teacher
            if teacher is None:  # build_datasets joins features whenever it is given a store and a set
                raise TrainError(f"feature set {cfg.distill.feature_set!r} was not joined to the training split")
            mean, std = teacher.stats()
            self.stats = kd.FeatureStats(torch.from_numpy(mean).to(self.device), torch.from_numpy(std).to(self.device))
        broadcast_module(self.model, di)
        if self.projector is not None:
            broadcast_module(self.projector, di)
        # distinct dropout draws per rank; rank 0 keeps the single-process stream
        torch.manual_seed(mix_seed(cfg.seed, di.rank, 0xD0) if di.rank else cfg.seed)

        self.sampler = GlobalBatchSampler(
            len(self.train_ds), cfg.batch_size, cfg.seed, di.rank, di.world, cfg.max_steps_per_epoch
        )
        self.steps_per_epoch = self.sampler.num_batches
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.loader_gen = torch.Generator()
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(
            self.train_ds,
            batch_size=self.sampler.local_batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            worker_init_fn=seed_worker,
            generator=self.loader_gen,
            pin_memory=pin,
            drop_last=True,
            # Worker processes live for the run, not one epoch: items are a function of (seed,
            # epoch, index) through the dataset's shared epoch counter, not of worker seeds.
            persistent_workers=cfg.workers > 0,
        )
        eval_bs = cfg.eval.batch_size or max(1, cfg.batch_size // di.world)
        val_idx = list(range(di.rank, len(self.val_ds), di.world))
        self.val_loader = DataLoader(
            torch.utils.data.Subset(self.val_ds, val_idx),
            batch_size=eval_bs,
            shuffle=False,
            num_workers=cfg.workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=pin,
        )

        # BatchNorm statistics for evaluation are recomputed over a fixed subset of the training
        # set in its deterministic (validation-style) view, batched as in training.
        n_bn = min(len(self.train_ds), cfg.eval.bn_samples)
        bn_order = torch.randperm(
            len(self.train_ds), generator=torch.Generator().manual_seed(mix_seed(cfg.seed, 0xB4))
        ).tolist()
        bn_ds = SkeletonDataset(self.train_ds.collection, cfg.data, train=False, seed=cfg.seed)
        self.bn_loader = DataLoader(
            torch.utils.data.Subset(bn_ds, sorted(bn_order[:n_bn])[di.rank :: di.world]),
            batch_size=self.sampler.local_batch,
            shuffle=False,
            num_workers=cfg.workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=pin,
        )
        self.bn_stale = True

        params = list(self.model.parameters()) + (list(self.projector.parameters()) if self.projector else [])
        self.params = params
        self.optimizer = _build_optimizer(cfg, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor_fn(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # DDP-wrapped or not, one call per step: streams -> (log-probabilities, features)
        self.forward: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]
        if di.active:
            # An input stream the run does not feed leaves its input BatchNorm without gradients,
            # which DDP's reducer refuses at the next step ("Expected to have finished reduction").
            # Freeze it: it stays in the state dict (the student loads strictly into the reference
            # LAST v2) and the optimizer skips it as it did before (it never had a gradient).
            for name, bn in zip(STREAM_ORDER, self.model.data_bn, strict=True):
                if name not in cfg.data.streams:
                    bn.requires_grad_(False)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(_WithFeatures(self.model), device_ids=ids)
        else:
            self.forward = _WithFeatures(self.model)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        # Losses stay on the device between syncs: a float() per step would stall a GPU on every
        # step of a 3M-parameter student. On the CPU a sync costs nothing, so it reports each step.
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY_STEPS

    def resume(self) -> None:
        """Continue from ``run_dir/last.pt`` when it exists (weights, optimizer, history, RNG states)."""
        path = self.run_dir / CHECKPOINT_NAME
        if not path.exists():
            return
        ck = load_checkpoint_file(path)
        check_config_hash(ck, self.config, path)
        try:
            self.model.load_state_dict(ck["model"])
            if self.projector is not None:
                self.projector.load_state_dict(ck["projector"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ResumeError(f"{path}: checkpoint does not fit this run ({str(exc)[:300]})") from None
        scaler_note = load_scaler_state(self.scaler, ck.get("scaler"))
        skipped = [scaler_note] if scaler_note else []
        self.history = list(ck["history"])
        self.start_epoch = int(ck["epoch"])
        rng = ck.get("rng") or []
        if len(rng) == self.di.world:
            skipped += set_rng_state(rng[self.di.rank])
        else:
            skipped.append(
                f"the RNG states of a {len(rng)}-rank run on {self.di.world} rank(s): random streams restart"
            )
        for note in skipped:
            log.warning("resuming %s: not restored: %s", path, note)
        log.info("resumed %s at epoch %d/%d", path, self.start_epoch, self.config.epochs)

    def save_checkpoint(self, epoch_done: int) -> None:
        """Write the complete state after ``epoch_done`` epochs to ``run_dir/last.pt`` (rank 0 writes)."""
        rng = gather(rng_state(), self.di)
        if not self.di.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config_hash": self.config.config_hash(),
                "config": self.config.model_dump(mode="json"),
                "epoch": epoch_done,
                "step": epoch_done * self.steps_per_epoch,
                "model": self.model.state_dict(),
                "projector": self.projector.state_dict() if self.projector is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "history": self.history,
            },
            self.run_dir / CHECKPOINT_NAME,
        )

    # -- steps ---------------------------------------------------------------------------------
    def _emit(self, progress: Progress) -> None:
        if self.hooks.on_progress is not None and self.di.is_main:
            self.hooks.on_progress(progress)

    def _cancel_requested(self) -> bool:
        local = bool(self.hooks.should_cancel()) if self.hooks.should_cancel is not None else False
        return any_rank(local, self.di, self.device)

    def train_step(self, batch: dict[str, Any], global_step: int) -> tuple[dict[str, Tensor], float]:
        """One optimizer step on ``batch``; this rank's losses as 0-d tensors on the device (no
        host sync here: :meth:`sync_losses` turns a window of them into numbers) and alpha."""
        cfg = self.config
        dev = self.device
        streams: dict[str, Tensor] = {s: batch[s].to(dev, non_blocking=True) for s in cfg.data.streams}
        target = batch["label"].to(dev, non_blocking=True)
        alpha = float(kd.alpha_at(cfg.distill, global_step / self.total_steps)) if self.projector is not None else 0.0
        teacher = mask = None
        if alpha > 0:
            teacher = batch["teacher"].to(dev, non_blocking=True)
            mask = batch["has_teacher"].to(dev, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.bn_stale = True
        with self.autocast():
            logprob, feat = self.forward(streams)
        loss, parts = kd.total_loss(
            logprob.float(),
            target,
            cfg.label_smoothing,
            feat.float(),
            teacher,
            mask,
            alpha,
            self.projector if alpha > 0 else None,
            cfg.distill,
            self.stats,
        )
        self.scaler.scale(loss).backward()
        if self.di.active and self.projector is not None:
            allreduce_mean_grads(list(self.projector.parameters()), self.di.world)
        # unscale_ is a no-op without fp16, so the norm is always that of the true gradients; an
        # infinite max_norm scales by exactly 1.0 (no clipping) and just measures (logged as grad_norm).
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, cfg.grad_clip if cfg.grad_clip is not None else math.inf
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        values = {k: torch.as_tensor(v).detach() for k, v in parts.items()}
        values["total"] = loss.detach()
        values["grad_norm"] = grad_norm.detach()
        return values, alpha

    def sync_losses(self, window: dict[str, Tensor], steps: int, last_step: int) -> dict[str, float]:
        """The mean losses of the last ``steps`` steps over the global batch, as numbers: one host
        sync (and one all-reduce under DDP) per window instead of per step. Raises TrainError
        when the loss stopped being finite in the window."""
        keys = sorted(window)
        t = torch.stack([window[k] for k in keys])
        if self.di.active:  # the global batch's loss, not this rank's slice
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.di.world
        means = dict(zip(keys, (t / steps).tolist(), strict=True))
        if not math.isfinite(means["total"]):
            first = last_step - steps + 1
            where = f"step {last_step}" if steps == 1 else f"steps {first}-{last_step}"
            raise TrainError(f"loss is {means['total']} at {where}: training diverged (lower the lr or set grad_clip)")
        return means

    def run_epoch(self, epoch: int) -> bool:
        """Train one epoch; False when cancelled (mid-epoch, nothing of the epoch is saved)."""
        cfg = self.config
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.loader_gen.manual_seed(mix_seed(cfg.seed, epoch, self.di.rank, 0x10AD))
        self.model.train()
        if self.projector is not None:
            self.projector.train()
        sums: dict[str, float] = {}
        data_s = compute_s = 0.0
        t_epoch = time.perf_counter()
        t0 = time.perf_counter()
        n_steps = 0
        alpha = 0.0
        every = self.sync_every
        window: dict[str, Tensor] = {}
        in_window = 0
        for step, batch in enumerate(self.train_loader):
            t1 = time.perf_counter()
            data_s += t1 - t0
            # The cancel flag is local and cheap; under DDP agreeing on it is a collective, so
            # ranks agree at the syncs (a cancel then waits for at most `every` steps).
            if (not self.di.active or in_window == 0) and self._cancel_requested():
                return False
            global_step = epoch * self.steps_per_epoch + step
            losses, alpha = self.train_step(batch, global_step)
            for key, value in losses.items():
                window[key] = window[key] + value.double() if key in window else value.double()
            in_window += 1
            n_steps += 1
            if in_window < every and step + 1 < self.steps_per_epoch:
                t0 = time.perf_counter()
                compute_s += t0 - t1
                continue
            means = self.sync_losses(window, in_window, global_step)  # waits for the device
            for key, mean in means.items():
                sums[key] = sums.get(key, 0.0) + mean * in_window
            window, in_window = {}, 0
            t0 = time.perf_counter()
            compute_s += t0 - t1
            elapsed = t0 - t_epoch
            rate = n_steps * cfg.batch_size / max(elapsed, 1e-9)
            done = global_step + 1
            per_step = elapsed / n_steps
            self._emit(
                Progress(
                    epoch=epoch,
                    epochs=cfg.epochs,
                    step=step + 1,
                    steps_per_epoch=self.steps_per_epoch,
                    losses=means,
                    alpha=alpha,
                    samples_per_s=rate,
                    eta_s=per_step * (self.total_steps - done),
                    phase="train",
                    lr=float(self.optimizer.param_groups[0]["lr"]),
                )
            )
        if in_window:  # a loader shorter than steps_per_epoch (never with the global sampler)
            means = self.sync_losses(window, in_window, epoch * self.steps_per_epoch + n_steps - 1)
            for key, mean in means.items():
                sums[key] = sums.get(key, 0.0) + mean * in_window
        if n_steps == 0:
            raise TrainError("the training loader produced no batches")
        if self._cancel_requested():
            return False
        val = self.validate() if self.validates_after(epoch) else None
        wall = time.perf_counter() - t_epoch
        entry = {
            "epoch": epoch + 1,
            **{f"train_{k}": v / n_steps for k, v in sums.items()},
            "alpha_end": alpha,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "samples_per_s": n_steps * cfg.batch_size / max(compute_s + data_s, 1e-9),
            "data_s_per_step": data_s / n_steps,
            "compute_s_per_step": compute_s / n_steps,
            "epoch_s": wall,
            **{f"val_{k}": v for k, v in (val or {}).items()},
        }
        self.history.append(entry)
        self._emit(
            Progress(
                epoch=epoch,
                epochs=cfg.epochs,
                step=self.steps_per_epoch,
                steps_per_epoch=self.steps_per_epoch,
                losses={k: v / n_steps for k, v in sums.items()},
                alpha=alpha,
                samples_per_s=entry["samples_per_s"],
                eta_s=wall * (cfg.epochs - epoch - 1),
                phase="eval",
                lr=entry["lr"],
                val=val,
            )
        )
        return True

    # -- evaluation ------------------------------------------------------------------------------
    def refresh_bn_stats(self) -> None:
        """Recompute the BatchNorm statistics (``eval.bn_stats``) if the weights changed since."""
        mode = self.config.eval.bn_stats
        if mode == "running" or not self.bn_stale:
            return
        recompute_bn_stats(
            self.model,
            self.bn_loader,
            self.device,
            self.config.data.streams,
            per_stream=mode == "per_stream",
            autocast=self.autocast,
        )
        self.bn_stale = False

    def _predict_all(self, corruption: ev.Corruption | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Predictions over the whole val split, gathered on rank 0 (None on other ranks)."""
        self.refresh_bn_stats()
        broadcast_module(self.model, self.di)  # everyone evaluates rank 0's BN statistics
        parents = (
            data_streams.REFERENCE_BONE_PARENTS
            if self.config.data.streams_mode == "reference"
            else data_streams.NTU_BONE_PARENTS
        )
        lp, lb, idx = ev.predict(
            self.model,
            self.val_loader,
            self.device,
            self.config.data.streams,
            corruption=corruption,
            noise_seed=self.config.eval.noise_seed,
            bone_parents=parents,
            autocast=self.autocast,
        )
        parts = gather((lp, lb, idx), self.di)
        if not self.di.is_main:
            return None
        parts = [p for p in parts if p[0].size]
        lp = np.concatenate([p[0] for p in parts])
        lb = np.concatenate([p[1] for p in parts])
        order = np.argsort(np.concatenate([p[2] for p in parts]), kind="stable")
        return lp[order], lb[order]

    def validates_after(self, epoch: int) -> bool:
        """Whether the val split is scored after ``epoch`` (0-based); the same answer on every rank."""
        return (epoch + 1) % self.config.eval.every_epochs == 0 or epoch + 1 == self.config.epochs

    def validate(self) -> dict[str, float] | None:
        """Top-1, top-5 and NLL on the val split (None on ranks other than 0)."""
        got = self._predict_all()
        if got is None:
            return None
        lp, lb = got
        return {
            "top1": ev.topk_accuracy(lp, lb, 1),
            "top5": ev.topk_accuracy(lp, lb, 5),
            "nll": float(-lp[np.arange(len(lb)), lb].mean()),
        }

    def final_metrics(self) -> dict[str, Any]:
        """The full evaluation of the finished run, robustness included ({} on ranks other than 0)."""
        ecfg = self.config.eval
        got = self._predict_all()
        noisy: dict[str, float] = {}
        for corr in ev.corruptions_from(ecfg.jitter_stds, ecfg.joint_drop_probs, ecfg.frame_drop_probs):
            res = self._predict_all(corr)
            if res is not None:
                noisy[corr.key] = ev.topk_accuracy(res[0], res[1], 1)
        if got is None:
            return {}
        metrics = ev.compute_metrics(got[0], got[1], self.names)
        metrics["robustness"] = ev.robustness_summary(metrics["top1"], noisy)
        metrics["bn_stats"] = ecfg.bn_stats
        metrics["ce_floor"] = kd.smoothed_ce_floor(self.config.label_smoothing, self.info.num_classes)
        return metrics

    # -- whole run -----------------------------------------------------------------------------
    def result(self, state: RunState, metrics: dict[str, Any], epochs_done: int) -> TrainResult:
        """The run as a :class:`TrainResult` (weights copied to CPU)."""
        return TrainResult(
            state=state,
            model_state={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            metrics=metrics,
            history=list(self.history),
            config=self.config,
            data_info=self.info,
            run_dir=self.run_dir,
            epochs_completed=epochs_done,
            class_names=list(self.names),
            stream_bn=self.model.stream_bn_stats(),
        )

    def run(self) -> TrainResult:
        """Build, resume, train the remaining epochs (checkpoint after each), evaluate, save the result."""
        self.build()
        self.resume()
        cfg = self.config
        for epoch in range(self.start_epoch, cfg.epochs):
            if not self.run_epoch(epoch):
                log.info("cancelled during epoch %d; %s keeps epoch %d", epoch + 1, CHECKPOINT_NAME, epoch)
                scored = [h for h in self.history if "val_top1" in h]
                metrics = {k[4:]: v for k, v in (scored[-1] if scored else {}).items() if k.startswith("val_")}
                metrics["data_skipped"] = self.info.data_skipped()
                return self.result(RunState.CANCELLED, metrics, epoch)
            self.save_checkpoint(epoch + 1)
        self._emit(
            Progress(
                cfg.epochs - 1, cfg.epochs, self.steps_per_epoch, self.steps_per_epoch, {}, 0.0, 0.0, 0.0, "final_eval"
            )
        )
        metrics = self.final_metrics()
        metrics["coverage_train"] = self.info.coverage_train
        metrics["coverage_val"] = self.info.coverage_val
        # skipped source files travel with the metrics: the job record, metrics.json and the
        # model card all carry them, and `lastkd train` prints them
        metrics["data_skipped"] = self.info.data_skipped()
        result = self.result(RunState.COMPLETED, metrics, cfg.epochs)
        if self.di.is_main:
            save_result(result)
        self._emit(
            Progress(
                cfg.epochs - 1,
                cfg.epochs,
                self.steps_per_epoch,
                self.steps_per_epoch,
                {},
                0.0,
                0.0,
                0.0,
                "done",
                val={"top1": metrics.get("top1", 0.0), "top5": metrics.get("top5", 0.0)},
            )
        )
        return result


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    store_path: Path | None = None,
    hooks: TrainHooks | None = None,
    data_roots: list[Path] | None = None,
) -> TrainResult:
    """Train (or resume, or return the finished result of) the run in ``run_dir``.

    ``store_path`` is the feature store (needed when distilling); ``data_roots``, when given,
    confines every data path to those folders (and is required for pickle sources).

    Raises :class:`TrainError` (and :class:`ResumeError`) with a message naming the problem.
    Inside an initialised process group (torchrun) this is the per-rank body of a DDP run.
    """
    run_dir = Path(run_dir)
    done = run_dir / RESULT_NAME
    if done.exists():
        result = load_result(run_dir)
        if result.config.config_hash() != config.config_hash():
            raise ResumeError(f"{done} belongs to a different training config; use a new run directory")
        return result
    store = Path(store_path) if store_path is not None else None
    roots = [Path(r) for r in data_roots] if data_roots is not None else None
    hooks = hooks or TrainHooks()
    tb = tblog.TensorBoardLogger(tblog.log_dir(run_dir)) if tblog.available() and dist_info().is_main else None
    if tb is not None:  # every run logs for TensorBoard, beside whatever hook the caller gave
        caller = hooks.on_progress

        def on_progress(p: Progress) -> None:
            tb.on_progress(p)
            if caller is not None:
                caller(p)

        hooks = TrainHooks(on_progress=on_progress, should_cancel=hooks.should_cancel)
    try:
        return TrainingRun(config, run_dir, store, hooks, roots).run()
    finally:
        if tb is not None:
            tb.close()


def save_result(result: TrainResult) -> Path:
    """Write ``run_dir/result.pt`` (student weights, metrics, history, config, data info) atomically."""
    path = result.run_dir / RESULT_NAME
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "state": result.state.value,
            "model": result.model_state,
            "metrics": result.metrics,
            "history": result.history,
            "config": result.config.model_dump(mode="json"),
            "data_info": asdict(result.data_info),
            "epochs_completed": result.epochs_completed,
            "class_names": result.class_names,
            "stream_bn": result.stream_bn,
        },
        path,
    )
    return path


def load_result(run_dir: Path) -> TrainResult:
    """The :class:`TrainResult` a finished run left in ``run_dir/result.pt``."""
    run_dir = Path(run_dir)
    path = run_dir / RESULT_NAME
    if not path.exists():
        raise TrainError(f"{path}: no finished result in this run directory")
    obj = load_checkpoint_file(path)
    try:
        return TrainResult(
            state=RunState(obj["state"]),
            model_state=obj["model"],
            metrics=obj["metrics"],
            history=obj["history"],
            config=TrainConfig.model_validate(obj["config"]),
            data_info=DataInfo(**obj["data_info"]),
            run_dir=run_dir,
            epochs_completed=int(obj["epochs_completed"]),
            class_names=list(obj["class_names"]),
            stream_bn=dict(obj.get("stream_bn") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{path}: malformed result file ({str(exc)[:200]})") from None


# --------------------------------------------------------------------------------------------
# torchrun entry point
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``[torchrun ...] python -m lastkd.student.training --config C --run-dir D [--store S]``.

    Exit status 0 when completed, 3 when cancelled, 2 for bad input.
    """
    # the first line of this docstring is the usage (``or ""``: docstrings are gone under -OO)
    usage = (main.__doc__ or "").partition("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m lastkd.student.training", description=usage)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--store", type=Path, default=None, help="feature store (needed when distilling)")
    parser.add_argument(
        "--data-root", type=Path, action="append", default=None, help="allowed data folder (repeatable)"
    )
    args = parser.parse_args(argv)
    from lastkd.student.config import ConfigError

    try:
        config = TrainConfig.from_yaml(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = init_process_group_from_env(use_cuda=torch.cuda.is_available() and config.device != "cpu")
    try:
        result = train(config, args.run_dir, store_path=args.store, data_roots=args.data_root)
    except (TrainError, ValueError, OSError) as exc:  # bad data/store/run dir: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0 if result.state is RunState.COMPLETED else 3


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
