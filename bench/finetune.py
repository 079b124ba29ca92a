"""Teacher fine-tuning benchmark: does the skeleton-guided person crop help, what does it cost, and
does decoding keep up with the model?

On a synthetic RGB set (``lastkd synth``: people drawn small in a wide frame, 3 classes, 12 clips
per class) the tiny VideoMAE V2 is fine-tuned twice with the same recipe and seed, once on whole
frames and once on the person box from the skeletons' colorX/colorY columns:

* ``val_top1_crop`` / ``val_top1_full``: multi-view val top-1 of each (chance 1/3);
* ``train_clips_per_s``: training throughput of the crop run (decode + step, 2 cores);
* ``loader_vs_step``: seconds the loader (one process) needs to produce a batch over the seconds
  one training step takes on a ready batch, at the official input geometry (16 frames every 4th,
  224 px) with the tiny model (<= 0.5: decoding keeps up with this model on this CPU);
* ``crop_cost_ms_per_clip``: extra decode time per 16-frame clip of the real 1080p NTU sample
  with the person crop (cut at full resolution, then resized) over the plain short-side resize,
  and ``crop_cost_ratio`` the same as a ratio.

* ``transcode_decode_speedup``: clips/s decoding the NTU sample (16 frames, short side 224, centre
  crop: the teacher's input) after ``lastkd transcode`` to a short side of 256, over the original
  1080p file (target >= 5).

``--quick``: 40 epochs instead of 100, fewer repeats. ``--gpu`` (a lent GPU): ViT-B at the official
geometry (16 x 224, bf16, batch 16, 2 loader workers) on copies of the real NTU clip for 20 steps,
reporting ``train_clips_per_s`` and ``gpu_wait_fraction`` (the share of step time spent waiting for
the loader); exits 3 without CUDA. Prints ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import NTU_CLIP  # noqa: E402  (after the path setup above)


def recipe(synth: Path, crop: bool, epochs: int, size: int = 48, frames: int = 8, rate: int = 2) -> Any:
    """The demo teacher's recipe (one copy: ``lastkd.services.demo_teacher.synthetic_recipe``)."""
    from lastkd.services.demo_teacher import synthetic_recipe

    return synthetic_recipe(
        synth / "videos",
        synth / "skeletons",
        crop=crop,
        epochs=epochs,
        size=size,
        frames=frames,
        rate=rate,
        name="bench-teacher",
    )


def loader_vs_step(cfg: Any, batches: int = 6) -> float:
    """Seconds per batch of the training loader over seconds per training step on a ready batch."""
    from lastkd.finetune.clips import TrainClips, list_clips
    from lastkd.finetune.loop import build_model, model_input
    from lastkd.finetune.optim import soft_cross_entropy
    from lastkd.teacher.video import VideoLimits, normalize

    train, _ = list_clips(cfg)
    ds = TrainClips(train, cfg, VideoLimits())
    t0 = time.perf_counter()
    ready = [
        (torch.stack([ds[(b * 6 + i) % len(ds)][0] for i in range(cfg.batch_size)]), torch.arange(cfg.batch_size) % 3)
        for b in range(batches)
    ]
    load_s = (time.perf_counter() - t0) / batches
    model, _ = build_model(cfg, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pre = model_input(cfg)
    x, y = ready[0]
    soft_cross_entropy(model(normalize(x, pre)), torch.nn.functional.one_hot(y, 3).float()).backward()  # warm-up
    t0 = time.perf_counter()
    for x, y in ready:
        loss = soft_cross_entropy(model(normalize(x, pre)), torch.nn.functional.one_hot(y, 3).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / batches
    return load_s / step_s


def crop_cost(repeats: int) -> tuple[float, float]:
    """Extra ms per 16-frame clip of the NTU sample with the person crop, and the time ratio."""
    from lastkd.ntu.skeleton import color_boxes, person_box
    from lastkd.teacher.video import PreprocessConfig, VideoLimits, decode_frames

    skeleton = NTU_CLIP.with_name(NTU_CLIP.name.replace("_rgb.avi", ".skeleton"))
    cfg = PreprocessConfig(num_frames=16, size=256)
    pick = lambda n: [min(n - 1, 4 * i) for i in range(16)]  # noqa: E731
    times = {}
    for mode in ("plain", "crop"):
        t0 = time.perf_counter()
        for _ in range(repeats):
            box = person_box(color_boxes(skeleton), 0.15) if mode == "crop" else None
            decode_frames(NTU_CLIP, pick, cfg, VideoLimits(), threads=2, box=box)
        times[mode] = (time.perf_counter() - t0) / repeats
    return 1000 * (times["crop"] - times["plain"]), times["crop"] / times["plain"]


def transcode_speedup(tmp: Path, repeats: int) -> float:
    """Decode clips/s of the transcoded NTU sample over the original's."""
    from lastkd.teacher.transcode import transcode_file
    from lastkd.teacher.video import PreprocessConfig, VideoLimits, decode_clip

    small = tmp / NTU_CLIP.name
    transcode_file(NTU_CLIP, small, 256)
    cfg = PreprocessConfig(num_frames=16, size=224)
    rates = {}
    for name, path in (("original", NTU_CLIP), ("transcoded", small)):
        decode_clip(path, cfg, VideoLimits(), threads=1)  # warm the file cache
        t0 = time.perf_counter()
        for _ in range(repeats):
            decode_clip(path, cfg, VideoLimits(), threads=1)
        rates[name] = repeats / (time.perf_counter() - t0)
    print(f"decode clips/s: original {rates['original']:.2f}, transcoded {rates['transcoded']:.2f}", file=sys.stderr)
    return rates["transcoded"] / rates["original"]


def gpu_run(steps: int = 20) -> dict[str, Any]:
    """ViT-B fine-tuning steps on CUDA in bf16 at 16 x 224, batch 16, on copies of the NTU clip."""
    import shutil

    from lastkd.finetune.config import FinetuneConfig
    from lastkd.finetune.loop import finetune

    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        videos.mkdir()
        for performer, action in [(p, a) for p in (1, 2, 3, 4) for a in range(1, 9)]:  # xsub: 1, 2, 4 train
            shutil.copy(NTU_CLIP, videos / f"S001C001P{performer:03d}R001A{action:03d}_rgb.avi")
        cfg = FinetuneConfig.from_dict(
            {
                "name": "gpu-bench",
                "data": {"path": str(videos)},
                "epochs": 1,
                "batch_size": 16,
                "max_steps_per_epoch": steps,
                "workers": 2,
                "device": "cuda",
                "eval": {"temporal_views": 1, "spatial_crops": 1},
            }
        )
        t0 = time.perf_counter()
        result = finetune(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
    epoch = result.history[0]
    return {
        "train_clips_per_s": round(epoch["clips_per_s"], 1),
        "gpu_wait_fraction": round(epoch["data_wait_fraction"], 3),
        "wall_s": round(wall, 1),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the epochs (under a minute on 2 cores)")
    parser.add_argument("--gpu", action="store_true", help="ViT-B bf16 on a lent GPU (exit 3 without CUDA)")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            print(json.dumps({"ok": False, "error": "CUDA is not available"}))
            return 3
        print(json.dumps(gpu_run()))
        return 0

    from lastkd.finetune.loop import finetune
    from lastkd.student.synth import generate

    torch.set_num_threads(2)
    epochs = 40 if args.quick else 100
    out: dict[str, Any] = {"epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        synth = Path(tmp) / "synth"
        generate(synth, classes=3, samples_per_class=12, frames=40, video=True, seed=0)
        for crop in (True, False):
            t0 = time.perf_counter()
            result = finetune(recipe(synth, crop, epochs), Path(tmp) / f"run-{crop}")
            key = "crop" if crop else "full"
            out[f"val_top1_{key}"] = round(result.metrics["top1"], 4)
            out[f"wall_s_{key}"] = round(time.perf_counter() - t0, 1)
            if crop:
                rates = [h["clips_per_s"] for h in result.history]
                out["train_clips_per_s"] = round(sum(rates) / len(rates), 1)
            print(f"{key}: val top-1 {result.metrics['top1']:.3f} in {out[f'wall_s_{key}']} s", file=sys.stderr)
        # the official input geometry (16 frames every 4th, 224 px) on the tiny model
        out["loader_vs_step"] = round(loader_vs_step(recipe(synth, True, epochs, 224, 16, 4)), 3)
        out["transcode_decode_speedup"] = round(transcode_speedup(Path(tmp), 3 if args.quick else 8), 2)
    cost_ms, ratio = crop_cost(2 if args.quick else 5)
    out["crop_cost_ms_per_clip"] = round(cost_ms, 1)
    out["crop_cost_ratio"] = round(ratio, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
