"""GPU smoke test: the first real CUDA run of lastkd, in one short script (< 10 minutes on one GPU).

Runs, each under its own time limit, and prints ONE JSON object on the last line of stdout:

* ``cuda``: torch and CUDA versions, the driver, the device name and memory;
* ``precision``: the teacher's bf16-vs-fp32 feature difference on the real NTU clip
  (``bench/precision.py --device cuda``);
* ``teacher``: embedding throughput of the engine on copies of the real NTU clip, ViT-B bf16
  batch 32, CPU decoders (``bench/teacher.py --gpu``);
* ``nvdec``: whether NVDEC decodes here (``lastkd.teacher.video.check_decoder``) and, if so, whether
  the real NTU clip's frames (16 x 224, what the teacher sees) equal software decoding's, with the
  decode time of each (not part of ``ok``: a GPU without usable NVDEC still passes the smoke test);
* ``finetune``: the teacher's fine-tuning, ViT-B bf16 batch 16 at 16 x 224 on copies of the NTU
  clip (``bench/finetune.py --gpu``): clips/s and the share of time spent waiting for the loader;
* ``student``: a short distillation-free run of LAST v2 in bf16 AMP on CUDA, cancelled after its
  first epoch and resumed on CUDA to the end (samples/s per epoch, the resume's epochs, the
  published-load check), i.e. the loop, cancel and resume on the device.

Without CUDA it fails at once with exit 3 and says so in the JSON (``"ok": false``): the tests run
it that way. Outputs (logs, run folders) go under ``--out`` (default ``$OUT`` or a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import NTU_CLIP  # noqa: E402  (after the path setup above)


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                found: dict[str, Any] = json.loads(line)
                return found
            except ValueError:
                return None
    return None


def _bench(script: str, args: list[str], limit_s: float, out: Path) -> dict[str, Any]:
    """Run one bench script; its last JSON line, or what went wrong."""
    log = out / f"{Path(script).stem}.log"
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=limit_s, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        log.write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {"ok": False, "error": f"timed out after {limit_s:.0f} s", "log": str(log)}
    log.write_text(done.stdout + done.stderr)
    result = _last_json(done.stdout)
    if done.returncode != 0 or result is None:
        return {"ok": False, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}", "log": str(log)}
    return {"ok": True, "seconds": round(time.monotonic() - t0, 1), **result}


def _student(out: Path) -> dict[str, Any]:
    """A bf16 AMP run on CUDA, cancelled after epoch 1, resumed on CUDA to the end."""
    from lastkd.student import training as engine
    from lastkd.student.config import TrainConfig
    from lastkd.student.paths import confine_config_paths
    from lastkd.student.publish import load_student, publish
    from lastkd.student.synth import generate

    roots = out / "datasets"
    generate(roots / "synth", classes=10, samples_per_class=24, frames=64, video=False, seed=0)
    config = TrainConfig.from_dict(
        {
            "name": "gpu-smoke",
            "data": {"path": "synth/skeletons", "num_frames": 64},
            "epochs": 3,
            "batch_size": 64,
            "device": "cuda",
            "amp": "bf16",
            "workers": 4,
            "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
        }
    )
    config = confine_config_paths(config, [roots])
    flag = {"cancel": False}

    def on_progress(p: engine.Progress) -> None:
        if p.phase == "eval" and p.epoch == 0:
            flag["cancel"] = True

    run_dir = out / "student-run"
    hooks = engine.TrainHooks(on_progress=on_progress, should_cancel=lambda: flag["cancel"])
    first = engine.train(config, run_dir, hooks=hooks)
    resumed = engine.train(config, run_dir)
    published = publish(resumed, out / "registry", job_id="gpu-smoke")
    load_student(published.path)  # strict
    return {
        "ok": first.state is engine.RunState.CANCELLED and resumed.state is engine.RunState.COMPLETED,
        "cancelled_after_epochs": first.epochs_completed,
        "resumed_to_epochs": resumed.epochs_completed,
        "samples_per_s": [round(h["samples_per_s"], 1) for h in resumed.history],
        "val_top1": resumed.metrics.get("top1"),
    }


def _nvdec(clip: Path) -> dict[str, Any]:
    """NVDEC against software decoding on ``clip``: usable, frames equal, seconds of each."""
    import numpy as np

    from lastkd.teacher.video import PreprocessConfig, VideoLimits, check_decoder, decode_clip

    problem = check_decoder("nvdec")
    if problem is not None:
        return {"usable": False, "reason": problem}
    cfg, times, views = PreprocessConfig(num_frames=16, size=224), {}, {}
    for decoder in ("cpu", "nvdec"):
        t0 = time.perf_counter()
        views[decoder] = decode_clip(clip, cfg, VideoLimits(), threads=1, decoder=decoder).views
        times[decoder] = round(time.perf_counter() - t0, 3)
    diff = np.abs(views["cpu"].astype(np.int16) - views["nvdec"].astype(np.int16))
    return {"usable": True, "frames_equal": bool((diff == 0).all()), "max_abs_diff": int(diff.max()), "seconds": times}


def main(argv: list[str] | None = None) -> int:
    """Run the GPU smoke test; exit 0 when every part passed, 1 when one failed, 3 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--clips", type=int, default=32, help="copies of the NTU clip to embed (default 32)")
    parser.add_argument(
        "--clip",
        type=Path,
        default=NTU_CLIP,
        help="the real NTU clip (carry it to the GPU machine; no synthetic stand-in)",
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if not args.clip.is_file():
        print(f"gpu_smoke: the NTU clip is missing: {args.clip} (pass --clip)", file=sys.stderr)
        print(json.dumps({"ok": False, "error": f"clip not found: {args.clip}"}))
        return 2
    if not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available to this Python: nothing to measure", file=sys.stderr)
        print(json.dumps({"ok": False, "error": "CUDA is not available", "torch": torch.__version__}))
        return 3
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "cuda": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "driver": driver or None,
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
        },
        "precision": _bench("bench/precision.py", ["--device", "cuda", "--video", str(args.clip)], 120, out),
        "teacher": _bench(
            "bench/teacher.py",
            ["--gpu", "--batch", "32", "--clips", str(args.clips), "--clip", str(args.clip)],
            240,
            out,
        ),
    }
    try:
        result["nvdec"] = _nvdec(args.clip)
    except Exception as exc:  # noqa: BLE001 - a smoke test reports every failure in its JSON
        result["nvdec"] = {"usable": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
    result["finetune"] = _bench("bench/finetune.py", ["--gpu"], 180, out)
    try:
        result["student"] = _student(out)
    except Exception as exc:  # noqa: BLE001 - a smoke test reports every failure in its JSON
        result["student"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    parts = [result["precision"], result["teacher"], result["finetune"], result["student"]]
    result["ok"] = all(p.get("ok") for p in parts)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
