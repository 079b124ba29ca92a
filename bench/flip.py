"""Flip benchmark: how far apart are the teacher vectors of a clip and of its flipped copy?

The student's flip augmentation plays a clip backwards (LAST v2's temporal flip), while the
stored teacher vector was computed on the clip played forwards. Distilling a flipped sample
towards the forward vector is a mismatch whose size depends on the teacher: this benchmark embeds
the real NTU sample (``../shared/data``) forwards, backwards and with its frames in a random order
(the same frames without coherent motion, a reference point), and reports the cosines between
the teacher vectors. lastkd's default (``distill.flipped_views: skip``) leaves flipped samples
out of the distillation term; ``reuse`` distils them towards the forward vector anyway.

* ``cos_forward_reversed``: cosine of the forward and the time-reversed clip's vectors;
* ``cos_forward_shuffled``: cosine of the forward and the frame-shuffled clip's vectors;
* ``reversal_vs_shuffle_distance``: (1 - cos_reversed) / (1 - cos_shuffled): how much of the
  "no coherent motion" distance reversal alone costs (about 1: the teacher sees a reversed clip as
  a different clip; about 0: reversal does not matter to it).

Without ``--weights`` the teacher is random-init (labelled so): its vectors carry no class
information and every clip looks alike to it, so the figures only prove the pipeline; run with
the official checkpoint (``--weights vit_b_k710_dl_from_giant.pth``) for the real answer.
``--quick``: the shallow teacher (2 blocks), one view. Prints ONE JSON object on the last line.
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
    """Embed the sample three ways and print the cosines (JSON on the last line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-block teacher (under a minute on 2 cores)")
    parser.add_argument("--weights", type=Path, default=None, help="official VideoMAE V2 ViT-B checkpoint")
    parser.add_argument("--video", type=Path, default=NTU_CLIP, help="the clip to measure (default: the NTU sample)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from lastkd.teacher.video import PreprocessConfig, VideoLimits, load_clip

    torch.manual_seed(args.seed)
    preprocess = PreprocessConfig()
    shallow = args.quick and args.weights is None
    model, weights = vit_b_teacher(shallow, args.weights, preprocess.num_frames)
    t0 = time.perf_counter()
    clip = load_clip(args.video, preprocess, VideoLimits())  # (V, 3, T, S, S), the stored protocol
    order = torch.randperm(clip.shape[2], generator=torch.Generator().manual_seed(args.seed))
    views = {"forward": clip, "reversed": clip.flip(2), "shuffled": clip[:, :, order]}
    with torch.inference_mode():
        vectors = {k: model.embed(v).mean(0) for k, v in views.items()}  # mean over views, as stored

    def cos(a: str, b: str) -> float:
        return float(torch.nn.functional.cosine_similarity(vectors[a], vectors[b], dim=0))

    reversed_cos, shuffled_cos = cos("forward", "reversed"), cos("forward", "shuffled")
    ratio = (1 - reversed_cos) / (1 - shuffled_cos) if shuffled_cos < 1 else None
    print(f"teacher: VideoMAE V2 ViT-B ({weights}{', 2 blocks' if shallow else ''}); clip {args.video.name}")
    print(f"cos(forward, reversed) = {reversed_cos:.5f}; cos(forward, shuffled frames) = {shuffled_cos:.5f}")
    if weights == "random-init":
        print("random-init teacher: no class information; these figures prove the pipeline, not the cost")
    result = {
        "quick": args.quick,
        "weights": weights,
        "model": "videomae_v2_vit_b" + (" (2 blocks)" if shallow else ""),
        "clip": args.video.name,
        "cos_forward_reversed": round(reversed_cos, 6),
        "cos_forward_shuffled": round(shuffled_cos, 6),
        "reversal_vs_shuffle_distance": None if ratio is None else round(ratio, 4),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
