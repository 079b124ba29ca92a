"""Teacher throughput benchmark: the lastkd engine against what a user would write with HF.

Measured in one run (CPU unless ``--gpu``):

* ``e2e_clips_per_s``: clips/s of the ``lastkd embed`` engine (decoder processes + batched
  inference + LMDB writes) on N distinct copies of the real NTU clip plus one synthetic 1080p
  clip; ``e2e_vs_hf`` divides it by the clips/s of the baseline a user would write:
  ``transformers.VideoMAEModel`` (random weights, same shape), PyAV decoding every frame to RGB,
  ``VideoMAEImageProcessor``, one clip at a time.
* ``model_s_per_clip``: forward seconds per clip of our model; ``model_vs_matmul_bound`` divides
  it by the time the model's FLOPs would take at the fp32 matmul rate measured in this run.
* ``decode_clips_per_s_per_core``: decode + sample + resize/crop of the NTU clip on one core.
* ``service_8_vs_1``: HTTP service throughput with 8 concurrent clients over 1 client.

``--quick`` (under a minute on 2 cores) uses 2 clips, a 2-block ViT-B for the engine/HF/model
figures and the tiny registry model for the service; the JSON says so. ``--gpu`` measures ViT-B
bf16 batch 32 on CUDA and the decode-bound limit of the machine instead (see bench/teacher_gpu.sh).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import NTU_CLIP  # noqa: E402  (after the path setup above)

VIT_B = dict(embed_dim=768, num_heads=12, mlp_ratio=4.0, patch_size=16)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# inputs


def ntu_copies(dest: Path, n: int, tag: str) -> list[Path]:
    """n copies of the NTU clip with distinct bytes (a unique trailer FFmpeg ignores), so no copy
    is answered from the store by content hash, and distinct NTU sample names."""
    data = NTU_CLIP.read_bytes()
    out = []
    for i in range(n):
        path = dest / f"S001C001P001R001A{i + 1:03d}_rgb.avi"
        path.write_bytes(data + f"lastkd-bench-{tag}-{i:04d}".encode())
        out.append(path)
    return out


def synthetic_1080p(path: Path, frames: int) -> Path:
    """A 1920x1080 H.264 mp4 with moving content."""
    import av

    out = av.open(str(path), "w", format="mp4")
    try:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        base = np.zeros((1080, 1920, 3), np.uint8)
        base[...] = np.linspace(0, 120, 1920, dtype=np.uint8)[None, :, None]
        for i in range(frames):
            img = base.copy()
            x, y = (i * 37) % 1600, (i * 19) % 800
            img[y : y + 280, x : x + 320] = (230, 180, 40)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 30)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    finally:
        out.close()
    return path


# ------------------------------------------------------------------------------------------------
# models


def our_model(depth: int):
    import torch

    from lastkd.models.videomae import VideoMAEv2

    torch.manual_seed(0)
    return VideoMAEv2(depth=depth, num_classes=0, **VIT_B).eval().requires_grad_(False)


def hf_model(depth: int):
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=768,
        num_hidden_layers=depth,
        num_attention_heads=12,
        intermediate_size=3072,
        num_frames=16,
        tubelet_size=2,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
    )
    return VideoMAEModel(config).eval()


def vit_flops_per_clip(depth: int, frames: int = 16, size: int = 224, dim: int = 768, hidden: int = 3072) -> float:
    """Forward FLOPs (2 per multiply-add) of VideoMAE ViT on one clip."""
    n = (frames // 2) * (size // 16) ** 2
    patch = 2 * n * dim * (3 * 2 * 16 * 16)
    block = 2 * n * dim * (3 * dim + dim + 2 * hidden) + 4 * n * n * dim
    return float(patch + depth * block)


def matmul_gflops(device: str = "cpu", dtype=None, size: int = 2048, seconds: float = 1.5) -> float:
    """Sustained GFLOP/s of a large square matmul (the attainable peak for dense layers)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, batch: int, reps: int, device: str = "cpu", precision: str = "fp32") -> float:
    """Best seconds per clip of the teacher feature (embed) over ``reps`` timed batches (after one warm-up)."""
    import torch

    from lastkd.models.videomae import inference_context

    x = torch.randn(batch, 3, 16, 224, 224, device=device)
    best = float("inf")
    with inference_context(device, precision):
        model.embed(x)
        sync(device)
        for _ in range(reps):
            start = time.perf_counter()
            model.embed(x)
            sync(device)
            best = min(best, (time.perf_counter() - start) / batch)
    return best


# ------------------------------------------------------------------------------------------------
# end to end


class EngineRun:
    """A started lastkd engine on a fresh store; ``embed(paths)`` returns clips/s (start-up
    excluded, as for the baseline)."""

    def __init__(
        self,
        store_dir: Path,
        model,
        *,
        device: str,
        batch: int,
        workers: int,
        precision: str = "auto",
        name: str = "videomae_v2_vit_b",
    ) -> None:
        from lastkd.featurestore import FeatureStore
        from lastkd.teacher.embedder import Embedder
        from lastkd.teacher.engine_config import EngineConfig
        from lastkd.teacher.video import PreprocessConfig, VideoLimits

        config = EngineConfig(
            model_name=name,
            random_init=True,
            device=device,
            batch_size=batch,
            max_wait_ms=20,
            decode_workers=workers,
            precision=precision,
        )
        self.store = FeatureStore(store_dir, map_size=256 << 20)
        self.engine = Embedder(config, PreprocessConfig(), VideoLimits(), self.store, model=model).start()
        self.engine.warm_up()

    def embed(self, paths: list[Path]) -> float:
        from lastkd.services.teacher_api.bulk import embed_files

        summary = embed_files(self.engine, paths, progress=False)
        if summary.failed or summary.embedded != len(paths):
            raise RuntimeError(f"engine run failed: {summary.failures}")
        return len(paths) / summary.seconds

    def close(self) -> None:
        self.engine.close()
        self.store.close()


def run_engine(paths: list[Path], store_dir: Path, model, **kwargs) -> float:
    """clips/s of the lastkd embed engine over ``paths`` in one run."""
    run = EngineRun(store_dir, model, **kwargs)
    try:
        return run.embed(paths)
    finally:
        run.close()


def run_hf_baseline(paths: list[Path], model) -> float:
    """clips/s of the straightforward transformers pipeline, one clip at a time."""
    import av
    import torch
    from transformers import VideoMAEImageProcessor

    processor = VideoMAEImageProcessor()  # shortest edge 224, centre crop 224, ImageNet mean/std
    start = time.perf_counter()
    for path in paths:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        idx = np.linspace(0, len(frames) - 1, 16).round().astype(int)
        inputs = processor([frames[i] for i in idx], return_tensors="pt")
        with torch.inference_mode():
            feature = model(**inputs).last_hidden_state.mean(dim=1)
        assert feature.shape == (1, 768)
    return len(paths) / (time.perf_counter() - start)


def decode_rate(path: Path, reps: int) -> float:
    """Decode + sample + resize/crop clips/s on one core (one process, one FFmpeg thread)."""
    from lastkd.teacher.video import PreprocessConfig, VideoLimits, prepare_clip

    cfg, limits = PreprocessConfig(), VideoLimits()
    prepare_clip(path, cfg, limits, threads=1)
    start = time.perf_counter()
    for _ in range(reps):
        prepare_clip(path, cfg, limits, threads=1)
    return reps / (time.perf_counter() - start)


def _decode_one(path: str) -> int:
    from lastkd.teacher.video import PreprocessConfig, VideoLimits, prepare_clip

    return prepare_clip(path, PreprocessConfig(), VideoLimits(), threads=1).shape[0]


def pooled_decode_rate(paths: list[Path], workers: int) -> float:
    """Aggregate decode clips/s with one process per core (the decode-bound limit)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_decode_one, [str(p) for p in paths[:workers]]))  # start + warm every worker
        start = time.perf_counter()
        list(pool.map(_decode_one, [str(p) for p in paths]))
        return len(paths) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# service


def service_ratio(
    paths_1: list[Path], paths_8: list[Path], data_dir: Path, model_name: str, decode_workers: int = 0
) -> tuple[float, float]:
    """clips/s through POST /embed with 1 client, then with 8 concurrent clients."""
    import uvicorn

    from lastkd.services.client import TeacherClient
    from lastkd.services.settings import load_settings
    from lastkd.services.teacher_api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = load_settings(
        data_dir=data_dir,
        teacher_model=model_name,
        teacher_random_init=True,
        teacher_device="cpu",
        teacher_port=port,
        api_token=None,
        store_map_size=256 << 20,
        teacher_batch_size=8,
        decode_workers=decode_workers,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    with TeacherClient(url) as probe:
        probe.wait_ready(timeout=300, interval=0.2)

    def post(path: Path) -> None:
        with TeacherClient(url, timeout=600) as client:
            result = client.embed([path]).results[0]
            if not result.ok or result.cached:
                raise RuntimeError(f"bad service answer for {path.name}: {result}")

    def sequential(paths: list[Path]) -> float:
        start = time.perf_counter()
        for p in paths:
            post(p)
        return time.perf_counter() - start

    def concurrent(paths: list[Path]) -> float:
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(post, paths))
        return time.perf_counter() - start

    h1, h8 = len(paths_1) // 2, len(paths_8) // 2
    try:  # ABBA: 1 client, 8 clients, 8 clients, 1 client
        t1 = sequential(paths_1[:h1])
        t8 = concurrent(paths_8[:h8]) + concurrent(paths_8[h8:])
        t1 += sequential(paths_1[h1:])
        one, eight = len(paths_1) / t1, len(paths_8) / t8
    finally:
        server.should_exit = True
        thread.join(60)
    return one, eight


# ------------------------------------------------------------------------------------------------


def bench_cpu(quick: bool, n_clips: int | None) -> dict:
    import torch

    depth = 2 if quick else 12
    n = n_clips or (2 if quick else 8)
    ncores = cores()
    work = Path(tempfile.mkdtemp(prefix="lastkd-bench-"))
    try:
        log(f"cores={ncores} torch threads={torch.get_num_threads()} depth={depth} clips={n}+1 synthetic 1080p")
        synth = synthetic_1080p(work / "synthetic_1080p.mp4", frames=32 if quick else 64)

        flops = vit_flops_per_clip(depth)
        model = our_model(depth)
        # Alternate matmul windows and model passes and keep the best of each, so both see the
        # same (fluctuating) share of a shared machine.
        gflops, model_s = 0.0, float("inf")
        for _ in range(3 if quick else 4):
            gflops = max(gflops, matmul_gflops(seconds=0.5))
            model_s = min(model_s, time_forward(model, batch=1, reps=2 if quick else 1))
        bound_s = flops / (gflops * 1e9)
        log(f"matmul {gflops:.1f} GFLOP/s; model {model_s:.3f} s/clip vs bound {bound_s:.3f} s")

        dec_ntu = decode_rate(NTU_CLIP, reps=2 if quick else 4)
        dec_synth = decode_rate(synth, reps=1 if quick else 3)
        log(f"decode per core: ntu {dec_ntu:.2f} clips/s, synthetic 1080p {dec_synth:.2f} clips/s")

        ours_dir, hf_dir = work / "ours", work / "hf"
        ours_dir.mkdir()
        hf_dir.mkdir()
        ours_paths = ntu_copies(ours_dir, n, "ours") + [shutil.copy(synth, ours_dir / "synthetic_1080p.mp4")]
        hf_paths = ntu_copies(hf_dir, n, "hf") + [synth]
        # ABBA order (engine, HF, HF, engine) over two halves of the clips, so a change in the
        # machine's load during the run does not favour either side.
        ours_paths = [Path(p) for p in ours_paths]
        half = (len(ours_paths) + 1) // 2
        # A shallower ViT-B under the registry's name (names are checked): the store is this run's own.
        engine = EngineRun(work / "store.lmdb", model, device="cpu", batch=4, workers=0, name="videomae_v2_vit_b")
        baseline = hf_model(depth)
        try:
            t_ours = len(ours_paths[:half]) / engine.embed(ours_paths[:half])
            t_hf = len(hf_paths[:half]) / run_hf_baseline(hf_paths[:half], baseline)
            t_hf += len(hf_paths[half:]) / run_hf_baseline(hf_paths[half:], baseline)
            t_ours += len(ours_paths[half:]) / engine.embed(ours_paths[half:])
        finally:
            engine.close()
        e2e, hf = len(ours_paths) / t_ours, len(hf_paths) / t_hf
        log(f"engine e2e {e2e:.3f} clips/s; HF baseline {hf:.3f} clips/s")
        del model, baseline

        service_model = "videomae_v2_tiny" if quick else "videomae_v2_vit_b"
        svc_dir = work / "svc"
        svc_dir.mkdir()
        m1, m8 = 4, 16  # 8 concurrent clients in each of two rounds
        copies = ntu_copies(svc_dir, m1 + m8, "svc")
        # The tiny model is decode-bound: give it a decoder per core (the CPU default is half,
        # leaving the other half to a real model).
        one, eight = service_ratio(
            copies[:m1], copies[m1:], work / "svc-data", service_model, decode_workers=ncores if quick else 0
        )
        log(f"service: 1 client {one:.3f} clips/s, 8 clients {eight:.3f} clips/s")
        return {
            "quick": quick,
            "model": f"VideoMAE V2 ViT-B width, depth {depth}"
            + (" (quick: shallower than the 12-block teacher)" if quick else ""),
            "service_model": service_model,
            "service_decode_workers": ncores if quick else max(1, ncores // 2),
            "clips": n + 1,
            "cores": ncores,
            "e2e_clips_per_s": round(e2e, 4),
            "hf_clips_per_s": round(hf, 4),
            "e2e_vs_hf": round(e2e / hf, 3),
            "model_s_per_clip": round(model_s, 4),
            "matmul_gflops": round(gflops, 1),
            "model_gflop_per_clip": round(flops / 1e9, 1),
            "matmul_bound_s_per_clip": round(bound_s, 4),
            "model_vs_matmul_bound": round(model_s / bound_s, 3),
            "decode_clips_per_s_per_core": round(dec_ntu, 3),
            "decode_1080p_synthetic_clips_per_s_per_core": round(dec_synth, 3),
            "service_1_client_clips_per_s": round(one, 4),
            "service_8_clients_clips_per_s": round(eight, 4),
            "service_8_vs_1": round(eight / one, 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_gpu(device: str, n_clips: int | None, batch: int, clip: Path = NTU_CLIP) -> dict:
    """ViT-B bf16 on CUDA: model clips/s, the decode-bound limit, and the engine end to end.

    Each stage is guarded: a failing stage is reported under "errors" and the others still run.
    """
    import torch

    ncores = cores()
    n = n_clips or 4 * ncores
    work = Path(tempfile.mkdtemp(prefix="lastkd-bench-gpu-"))
    out: dict = {"cores": ncores, "batch": batch, "precision": "bf16", "clips": n, "errors": {}}
    try:
        # Copies of the real clip only: a synthetic clip decodes ~3x faster and would flatter the
        # decode-bound figure (main() refuses to start without the clip).
        paths = []
        for i in range(n):
            path = work / f"gpu_{i:04d}{clip.suffix}"
            path.write_bytes(clip.read_bytes() + f"lastkd-bench-{i:04d}".encode())  # distinct sha256 each
            paths.append(path)
        out["clip"] = f"{clip.name} x {n} (the real NTU sample unless --clip says otherwise)"
        log(f"device={device} cores={ncores} batch={batch} clips={n}; {out['clip']}")

        stages = {}

        def stage(name, fn):
            start = time.perf_counter()
            try:
                stages[name] = fn()
            except Exception as exc:  # noqa: BLE001 - report and go on
                out["errors"][name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed: {exc}")
            log(f"{name}: {time.perf_counter() - start:.1f}s")

        # Decoding first, before this process initialises CUDA.
        stage("decode_core", lambda: decode_rate(paths[0], reps=3))
        stage("decode_pool", lambda: pooled_decode_rate(paths, ncores))
        if "decode_core" in stages:
            out["decode_clips_per_s_per_core"] = round(stages["decode_core"], 3)
            out["decode_bound_estimate_clips_per_s"] = round(stages["decode_core"] * ncores, 2)
        if "decode_pool" in stages:
            out["decode_bound_clips_per_s"] = round(stages["decode_pool"], 2)

        out["gpu"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (dry run)"
        model = our_model(12).to(device)
        stage("model", lambda: time_forward(model, batch=batch, reps=5, device=device, precision="bf16"))
        if device.startswith("cuda"):
            stage("matmul", lambda: matmul_gflops(device, torch.bfloat16, size=8192, seconds=2.0) / 1e3)
        if "model" in stages:
            out["model_clips_per_s"] = round(1 / stages["model"], 2)
        if "matmul" in stages and "model" in stages:
            out["matmul_bf16_tflops"] = round(stages["matmul"], 1)
            out["model_vs_matmul_bound"] = round(
                stages["model"] / (vit_flops_per_clip(12) / (stages["matmul"] * 1e12)), 3
            )
        stage("e2e", lambda: run_engine(paths, work / "store.lmdb", model, device=device, batch=batch, workers=ncores))
        if "e2e" in stages:
            out["e2e_clips_per_s"] = round(stages["e2e"], 2)
            if "decode_pool" in stages:
                out["e2e_vs_decode_bound"] = round(stages["e2e"] / stages["decode_pool"], 3)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="under a minute: 2 clips, 2-block ViT-B, tiny service model"
    )
    parser.add_argument("--gpu", action="store_true", help="ViT-B bf16 on CUDA and the decode-bound limit")
    parser.add_argument("--device", default="cuda", help="--gpu device (cpu only for a dry run)")
    parser.add_argument("--batch", type=int, default=32, help="--gpu batch size")
    parser.add_argument("--clips", type=int, default=None, help="number of NTU copies")
    parser.add_argument("--clip", type=Path, default=NTU_CLIP, help="--gpu: the clip to copy (default: the NTU sample)")
    args = parser.parse_args(argv)
    clip = args.clip if args.gpu else NTU_CLIP
    if not clip.is_file():
        print(f"bench: the clip is missing: {clip} (carry the real NTU sample; no synthetic stand-in)", file=sys.stderr)
        return 2
    result = bench_gpu(args.device, args.clips, args.batch, clip) if args.gpu else bench_cpu(args.quick, args.clips)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
