"""Precision benchmark: how far are the teacher's bf16 vectors from its fp32 vectors?

The teacher runs in bf16 autocast on CUDA by default (``LASTKD_TEACHER_PRECISION=auto``) and in
fp32 on the CPU; the precision is part of the feature-set id, so the two never share a set. This
measures the difference they would have made: the real NTU sample (``../shared/data``) embedded
by the same ViT-B in fp32 and in bf16 autocast (pooling and fc_norm stay fp32 in both), on the
device given (the CPU runs bf16 autocast too).

* ``bf16_vs_fp32_rel_l2``: ||v_bf16 - v_fp32|| / ||v_fp32|| of the stored vector;
* ``bf16_vs_fp32_cosine``: their cosine;
* ``bf16_s`` / ``fp32_s``: seconds per forward of one clip (after one warm-up).

Random-init weights (labelled) unless ``--weights``; ``--quick``: a 2-block ViT-B.
Prints ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import NTU_CLIP, vit_b_teacher  # noqa: E402  (after the path setup above)


def main(argv: list[str] | None = None) -> int:
    """Embed the sample in fp32 and bf16 and print the difference (JSON on the last line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-block teacher (seconds on 2 cores)")
    parser.add_argument("--weights", type=Path, default=None, help="official VideoMAE V2 ViT-B checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--video", type=Path, default=NTU_CLIP, help="the clip (default: the NTU sample)")
    args = parser.parse_args(argv)

    from lastkd.models.videomae import inference_context
    from lastkd.teacher.video import PreprocessConfig, VideoLimits, load_clip

    torch.manual_seed(0)
    preprocess = PreprocessConfig()
    shallow = args.quick and args.weights is None
    model, weights = vit_b_teacher(shallow, args.weights, preprocess.num_frames)
    device = torch.device(args.device)
    model = model.to(device)
    clip = load_clip(args.video, preprocess, VideoLimits()).to(device)

    def run(precision: str) -> tuple[torch.Tensor, float]:
        with inference_context(device, precision):
            model.embed(clip)  # warm-up
            t0 = time.perf_counter()
            out = model.embed(clip).mean(0).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) / clip.shape[0]

    full, t_full = run("fp32")
    half, t_half = run("bf16")
    rel = float((half - full).norm() / full.norm())
    cos = float(torch.nn.functional.cosine_similarity(half, full, dim=0))
    print(
        f"ViT-B{' (2 blocks)' if shallow else ''} {weights} on {device}: bf16 vs fp32 rel L2 {rel:.2e}, cosine {cos:.6f}"
    )
    result = {
        "quick": args.quick,
        "weights": weights,
        "model": "videomae_v2_vit_b" + (" (2 blocks)" if shallow else ""),
        "device": str(device),
        "bf16_vs_fp32_rel_l2": round(rel, 6),
        "bf16_vs_fp32_cosine": round(cos, 8),
        "fp32_s": round(t_full, 3),
        "bf16_s": round(t_half, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
