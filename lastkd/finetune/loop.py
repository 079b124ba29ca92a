"""The teacher fine-tuning loop: build, resume, train epochs, evaluate multi-view, publish.

Plain library code (no Celery, no settings): ``lastkd finetune-teacher`` and tests call
:func:`finetune` directly. Everything random is a function of the config's seed (the clip order
per epoch, each clip's window/crop/flip, each step's mixup), and the torch RNG state is saved at
every epoch boundary, so a run interrupted after any epoch and resumed ends with the weights of an
uninterrupted one (bit for bit on the CPU).

A published teacher is a folder: ``teacher.pth`` in the official checkpoint layout
(``{"model": state_dict}`` with ``q_bias``/``v_bias``; the official code and lastkd's strict
loader both read it) and ``lineage.json`` (parent weights' sha256, data, split, classes, config,
metrics, the file's own sha256). That sha256 is what names the feature sets embedded with it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from lastkd.atomic import write_atomic
from lastkd.devices import resolve_device
from lastkd.finetune.clips import ClipList, TrainClips, ValClips, list_clips
from lastkd.finetune.config import FinetuneConfig, FinetuneConfigError
from lastkd.finetune.optim import lr_at, mix_batch, param_groups, soft_cross_entropy
from lastkd.jsonsafe import to_jsonable
from lastkd.models.checkpoint_io import load_checkpoint, save_official
from lastkd.models.videomae import VideoMAEv2, create_videomae, keep_key_bias_zero
from lastkd.registry import LINEAGE_FILE, TEACHER_FILE, TEACHERS_FOLDER
from lastkd.student.checkpoints import atomic_torch_save
from lastkd.student.evaluate import topk_accuracy
from lastkd.student.rng import mix_seed, rng_state, seed_everything, seed_worker, set_rng_state
from lastkd.teacher.video import PreprocessConfig, VideoLimits, normalize

__all__ = [
    "FinetuneError",
    "FinetuneHooks",
    "FinetuneResult",
    "FinetuneState",
    "finetune",
    "publish_teacher",
    "publish_to_registry",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_KIND = "lastkd.teacher_finetune/1"


class FinetuneError(RuntimeError):
    """A fine-tuning run that cannot go on (diverged, unreadable checkpoint, other config)."""


class FinetuneState(str, Enum):
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"


@dataclass
class FinetuneHooks:
    """Callbacks of a run: progress lines and a cancel flag checked before every step."""

    on_epoch: Callable[[dict[str, Any]], None] | None = None
    should_cancel: Callable[[], bool] | None = None


@dataclass
class FinetuneResult:
    """What a run ends with: the model (CPU), its history and metrics, and where it ran."""

    state: FinetuneState
    model: VideoMAEv2
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    config: FinetuneConfig
    run_dir: Path
    epochs_completed: int
    num_classes: int
    parent_sha256: str | None
    train_clips: int
    val_clips: int


def _num_classes(cfg: FinetuneConfig, train: ClipList, val: ClipList) -> int:
    return cfg.data.classes or max(max(train.labels), max(val.labels)) + 1


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[VideoMAEv2, str | None]:
    """The model with a ``num_classes`` head, initialised from ``cfg.init`` (head replaced) or at
    random under the seed; returns it and the parent weights' sha256 (None for random init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_videomae(
            cfg.model,
            num_frames=cfg.num_frames,
            img_size=cfg.size,
            num_classes=num_classes,
            drop_path_rate=cfg.drop_path,
        )
    keep_key_bias_zero(model)  # the official layout has no key bias: training must not make one
    parent = None
    if cfg.init is not None:
        if not Path(cfg.init).is_file():
            raise FinetuneConfigError(f"init: checkpoint not found: {cfg.init}")
        try:
            parent = load_checkpoint(model, cfg.init, head="replace")
        except (ValueError, OSError, RuntimeError) as exc:
            raise FinetuneConfigError(f"init: cannot load {cfg.init}: {exc}") from None
    return model, parent


def model_input(cfg: FinetuneConfig) -> PreprocessConfig:
    """The geometry and normalisation of the model's input (frames x size, ImageNet mean/std)."""
    return PreprocessConfig(num_frames=cfg.num_frames, size=cfg.size)


def evaluate(model: VideoMAEv2, loader: DataLoader, cfg: FinetuneConfig, device: torch.device) -> dict[str, Any]:
    """Multi-view top-1/top-5: softmax averaged over each clip's temporal x spatial views."""
    pre = model_input(cfg)
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for views, label in loader:
            b, v = views.shape[:2]
            x = normalize(views.reshape(b * v, *views.shape[2:]).to(device), pre)
            with _autocast(cfg, device):
                logits = model(x)
            probs.append(torch.softmax(logits.float(), -1).view(b, v, -1).mean(1).cpu().numpy())
            labels.append(label.numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {"top1": topk_accuracy(p, y, 1), "top5": topk_accuracy(p, y, 5), "clips": len(y), "views": int(v)}


def _autocast(cfg: FinetuneConfig, device: torch.device) -> Any:
    enabled = device.type == "cuda" and cfg.amp == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _loader(dataset: Any, cfg: FinetuneConfig, batch: int, generator: torch.Generator | None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=generator is not None,
        generator=generator,
        num_workers=cfg.workers,
        worker_init_fn=seed_worker if cfg.workers else None,
        drop_last=generator is not None and len(dataset) >= batch,
        pin_memory=torch.cuda.is_available(),
    )


def finetune(
    cfg: FinetuneConfig,
    run_dir: Path,
    hooks: FinetuneHooks | None = None,
    limits: VideoLimits | None = None,
    roots: Sequence[Path] | None = None,
) -> FinetuneResult:
    """Fine-tune (or resume fine-tuning) the teacher ``cfg`` describes in ``run_dir``; with
    ``roots`` the clips a list file names are held to the data-root rule."""
    hooks = hooks or FinetuneHooks()
    limits = limits or VideoLimits()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    train, val = list_clips(cfg, roots)
    num_classes = _num_classes(cfg, train, val)
    model, parent = build_model(cfg, num_classes)
    model.to(device)
    depth = len(model.blocks)
    groups = param_groups(model, depth, cfg.optimizer.weight_decay, cfg.optimizer.layer_decay)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr, betas=cfg.optimizer.betas
    )
    train_ds = TrainClips(train, cfg, limits)
    steps_per_epoch = max(len(train_ds) // cfg.batch_size, 1)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.optimizer.warmup_epochs * steps_per_epoch)
    val_loader = _loader(ValClips(val, cfg, limits), cfg, 1, None)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ck_path = run_dir / CHECKPOINT_NAME
    seed_everything(cfg.seed)
    if ck_path.exists():
        ck = _read_checkpoint(ck_path, cfg)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        skipped = set_rng_state(ck["rng"])
        for line in skipped:
            log.warning("resume: not restored: %s", line)
        history, start_epoch = list(ck["history"]), int(ck["epoch"])
        log.info("resumed %s at epoch %d", run_dir, start_epoch)

    def result(state: FinetuneState, metrics: dict[str, Any], epochs: int) -> FinetuneResult:
        return FinetuneResult(
            state,
            model.cpu(),
            history,
            metrics,
            cfg,
            run_dir,
            epochs,
            num_classes,
            parent,
            len(train.paths),
            len(val.paths),
        )

    metrics: dict[str, Any] = {}
    pre = model_input(cfg)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, 0xF17E))
        loader = _loader(train_ds, cfg, cfg.batch_size, gen)
        t0, losses, seen = time.perf_counter(), [], 0
        wait_s, t_ready = 0.0, time.perf_counter()
        # islice: a loader longer than max_steps_per_epoch is not asked for a batch it won't train on
        for step, (clips, labels) in enumerate(itertools.islice(loader, steps_per_epoch)):
            wait_s += time.perf_counter() - t_ready  # the step waited this long for its batch
            if hooks.should_cancel is not None and hooks.should_cancel():
                return result(FinetuneState.CANCELLED, metrics, epoch)
            global_step = epoch * steps_per_epoch + step
            lr = lr_at(global_step, total, warmup, cfg.lr, cfg.optimizer.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x = normalize(clips.to(device, non_blocking=True), pre)
            y = labels.to(device)
            aug = cfg.augment
            mix_rng = random.Random(mix_seed(cfg.seed, global_step, 0x313C))
            x, target = mix_batch(
                x, y, num_classes, aug.mixup, aug.cutmix, aug.switch_prob, aug.label_smoothing, mix_rng
            )
            with _autocast(cfg, device):
                logits = model(x)
            loss = soft_cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            seen += len(labels)
            t_ready = time.perf_counter()
        if not losses:
            raise FinetuneError("the training loader produced no batches")
        mean_loss = float(torch.stack(losses).mean())
        if not np.isfinite(mean_loss):
            raise FinetuneError(f"loss is {mean_loss} in epoch {epoch + 1}: training diverged (lower the lr)")
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": mean_loss,
            "lr": lr,
            "clips_per_s": seen / max(time.perf_counter() - t0, 1e-9),
            # share of the epoch spent waiting for the loader (on a GPU: the device starved of data)
            "data_wait_fraction": wait_s / max(time.perf_counter() - t0, 1e-9),
        }
        if (epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.epochs:
            metrics = evaluate(model, val_loader, cfg, device)
            entry.update({f"val_{k}": v for k, v in metrics.items() if k in ("top1", "top5")})
        history.append(entry)
        atomic_torch_save(
            {
                "kind": CHECKPOINT_KIND,
                "config_hash": cfg.config_hash(),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "history": history,
            },
            ck_path,
        )
        if hooks.on_epoch is not None:
            hooks.on_epoch(entry)
    if not metrics:  # resumed after the last epoch: score the finished weights again
        metrics = evaluate(model, val_loader, cfg, device)
    return result(FinetuneState.COMPLETED, metrics, cfg.epochs)


def _read_checkpoint(path: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign: say which and why
        raise FinetuneError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ck, dict) or ck.get("kind") != CHECKPOINT_KIND:
        raise FinetuneError(f"{path}: not a lastkd teacher fine-tuning checkpoint")
    if ck.get("config_hash") != cfg.config_hash():
        raise FinetuneError(f"{path} was written by another config; use a new run folder or the config that started it")
    return ck


def publish_teacher(result: FinetuneResult, out_dir: Path, job_id: str | None = None) -> Path:
    """Write ``teacher.pth`` (official layout) and ``lineage.json`` into ``out_dir`` (a new or empty
    folder); returns the folder. Both files are written whole or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FinetuneError(f"{out_dir} is not empty: publish into a new folder")
    if result.state is not FinetuneState.COMPLETED:
        raise FinetuneError(f"only a completed run is published (this one is {result.state.value})")
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = save_official(result.model, out_dir / TEACHER_FILE)
    cfg = result.config
    lineage = {
        "teacher_sha256": digest,
        "model": cfg.model,
        "num_classes": result.num_classes,
        "num_frames": cfg.num_frames,
        "size": cfg.size,
        "parent_sha256": result.parent_sha256,
        "parent": str(cfg.init) if cfg.init else None,
        "data": cfg.data.model_dump(mode="json"),
        "train_clips": result.train_clips,
        "val_clips": result.val_clips,
        "job_id": job_id,
        "metrics": result.metrics,
        "history": result.history,
        "config": cfg.model_dump(mode="json"),
    }
    text = json.dumps(to_jsonable(lineage), indent=2) + "\n"
    write_atomic(out_dir / LINEAGE_FILE, lambda fh: fh.write(text.encode("utf-8")))
    return out_dir


def publish_to_registry(result: FinetuneResult, registry_dir: Path, job_id: str | None = None) -> Path:
    """Publish into ``<registry>/_teachers/<name>-<sha256[:12]>`` atomically; the folder is named by
    the weights, so publishing the same weights again (a re-run, a redelivered job) is the same
    folder (idempotent) and different weights never overwrite each other."""
    teachers = Path(registry_dir) / TEACHERS_FOLDER
    teachers.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=teachers))
    try:
        publish_teacher(result, tmp / "t", job_id=job_id)
        digest = json.loads((tmp / "t" / LINEAGE_FILE).read_text())["teacher_sha256"]
        final = teachers / f"{result.config.name}-{digest[:12]}"
        if not final.exists():
            os.replace(tmp / "t", final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
