"""LAST v2 skeleton action-recognition student, state-dict compatible with the reference.

Re-implementation of LAST_v2 from the public LAST repository (commit 8499c09) following
`shared/specs/last_v2.md` sections 1-6: attribute names, registration order, shapes and
initialisation match the reference so that its checkpoints load with ``strict=True`` and give
the same outputs. The computation is rearranged for speed where the maths is unchanged (one
1x1 conv over the stacked static-subset aggregations instead of four, phi applied before the
attention permutes, one backbone pass for all streams in eval mode).

On top of the reference forward, the model exposes the pooled pre-classifier feature used for
distillation (`forward_features`, `forward_with_features`).

Per-stream evaluation statistics. Training normalises each stream as its own batch in every
backbone BatchNorm (as the reference does), but the reference keeps one set of running statistics
per BatchNorm, blended over the three streams, for evaluation. Every backbone BatchNorm here is a
:class:`StreamBatchNorm2d`, which can additionally hold one (mean, var) pair per stream in
**non-persistent** buffers: they are not part of ``state_dict()``, so the weights still load
``strict=True`` into the reference, and a model without them (the default, and any reference
checkpoint) computes exactly the reference forward. ``set_stream_bn_stats`` installs them (the
trainer recomputes them over the training set, see ``lastkd.student.bn_stats``) and
``stream_bn_stats`` returns them for saving beside the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

NUM_JOINTS = 25
NUM_SUBSETS = 3
STREAM_ORDER: tuple[str, ...] = ("joint", "velocity", "bone")

# 1-based NTU bone edges exactly as listed in spec section 1.1 (hand edges included as given).
_NTU_EDGES_1BASED: tuple[tuple[int, int], ...] = (
    (1, 2),
    (2, 21),
    (3, 21),
    (4, 3),
    (5, 21),
    (6, 5),
    (7, 6),
    (8, 7),
    (9, 21),
    (10, 9),
    (11, 10),
    (12, 11),
    (13, 1),
    (14, 13),
    (15, 14),
    (16, 15),
    (17, 1),
    (18, 17),
    (19, 18),
    (20, 19),
    (22, 23),
    (23, 8),
    (24, 25),
    (25, 12),
)
_NTU_CENTER = 20  # 0-based spine-shoulder


# ----------------------------------------------------------------------------------------------
# Graph
# ----------------------------------------------------------------------------------------------


def build_ntu_spatial_adjacency() -> Tensor:
    """Return the (3, 25, 25) float32 'spatial' adjacency of the NTU RGB+D skeleton.

    Reproduces the reference graph including its ``max_hop = 1`` quirk (joints not adjacent to
    the centre are at infinite distance, so edges between them count as 'root'). Computed in
    float64 and cast to float32 at the end, as the reference does.
    """
    v = NUM_JOINTS
    link = np.zeros((v, v), dtype=np.float64)
    for i in range(v):
        link[i, i] = 1.0
    for a, b in _NTU_EDGES_1BASED:
        link[a - 1, b - 1] = 1.0
        link[b - 1, a - 1] = 1.0
    hop = np.full((v, v), np.inf)
    hop[link > 0] = 1.0
    np.fill_diagonal(hop, 0.0)

    adjacency = (hop <= 1).astype(np.float64)
    deg = adjacency.sum(axis=0)
    inv_deg = np.zeros_like(deg)
    inv_deg[deg > 0] = 1.0 / deg[deg > 0]
    norm = adjacency @ np.diag(inv_deg)  # Nrm[j, i] = Adj[j, i] / deg(i)

    subsets = []
    for h in (0, 1):
        root = np.zeros((v, v))
        close = np.zeros((v, v))
        further = np.zeros((v, v))
        for j in range(v):
            for i in range(v):
                if hop[j, i] != h:
                    continue
                # inf == inf is True here, which is what puts far-from-centre edges into 'root'.
                dj, di = hop[j, _NTU_CENTER], hop[i, _NTU_CENTER]
                if dj == di:
                    root[j, i] = norm[j, i]
                elif dj > di:
                    close[j, i] = norm[j, i]
                else:
                    further[j, i] = norm[j, i]
        if h == 0:
            subsets.append(root)
        else:
            subsets.append(root + close)
            subsets.append(further)
    return torch.tensor(np.stack(subsets), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class StreamBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that may also hold one eval (mean, var) pair per input stream.

    ``stream_mean`` / ``stream_var`` (S, C) are non-persistent buffers (empty by default), so the
    state dict is exactly that of ``BatchNorm2d``. In eval mode, when ``stream`` is set and the
    per-stream statistics exist, that stream's row normalises the input; otherwise (train mode,
    or no per-stream statistics) this is plain ``BatchNorm2d``. ``stream`` is set by
    :meth:`LASTv2.stream_context` for the duration of one stream's backbone pass.
    """

    # Buffers, declared so they type as tensors (nn.Module.__getattr__ says Tensor | Module).
    stream_mean: Tensor
    stream_var: Tensor
    # Never None: built with BatchNorm2d's default track_running_stats=True.
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_buffer("stream_mean", torch.empty(0, num_features), persistent=False)
        self.register_buffer("stream_var", torch.empty(0, num_features), persistent=False)
        self.stream: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.stream is None or self.stream_mean.shape[0] == 0:
            return super().forward(x)
        return F.batch_norm(
            x, self.stream_mean[self.stream], self.stream_var[self.stream], self.weight, self.bias, False, 0.0, self.eps
        )


class AdaptiveGraphConv(nn.Module):
    """Physical (K subsets) + learned + dynamic graph convolution with K + 2 1x1 convs."""

    A_physical: Tensor  # a buffer, declared so it types as a tensor

    def __init__(self, in_channels: int, out_channels: int, adjacency: Tensor, embed_ratio: int = 8) -> None:
        super().__init__()
        num_subsets, v, _ = adjacency.shape
        self.num_subsets = num_subsets
        self.A_learned = nn.Parameter(torch.zeros(v, v))
        # Deliberately the same tensor object as the model-level buffer `A` (shared storage).
        self.register_buffer("A_physical", adjacency)
        embed = max(4, in_channels // embed_ratio)
        self.node_proj = nn.Conv2d(in_channels, embed, 1, bias=False)
        self.subset_convs = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 1, bias=False) for _ in range(num_subsets + 2)
        )

    def learned_adjacency(self) -> Tensor:
        """Symmetrically degree-normalised |A_learned| (zero while A_learned is zero)."""
        mag = self.A_learned.abs()
        d = mag.sum(dim=1).clamp(min=1e-6).pow(-0.5)
        return d[:, None] * mag * d[None, :]

    def dynamic_adjacency(self, x: Tensor) -> Tensor:
        """Per-sample (N, V, V) softmax of joint-embedding cosine similarities."""
        emb = self.node_proj(x.mean(dim=2, keepdim=True)).squeeze(2).transpose(1, 2)  # (N, V, E)
        emb = F.normalize(emb, p=2.0, dim=-1, eps=1e-12)
        return torch.softmax(emb @ emb.transpose(1, 2), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, t, v = x.shape
        rows = x.reshape(n * c * t, v)
        static = [*self.A_physical.unbind(0), self.learned_adjacency()]
        # Static subsets: one tall (N*C*T, V) @ (V, V) product each, stacked along channels so the
        # K + 1 separate 1x1 convs become a single conv (same sum, measured fastest on CPU).
        agg = torch.cat([(rows @ a).view(n, c, t, v) for a in static], dim=1)
        weight = torch.cat([cast(nn.Conv2d, conv).weight for conv in self.subset_convs[: len(static)]], dim=1)
        out = F.conv2d(agg, weight)
        dyn = torch.bmm(x.reshape(n, c * t, v), self.dynamic_adjacency(x)).view(n, c, t, v)
        return out + self.subset_convs[len(static)](dyn)


class ST_JointAtt(nn.Module):  # noqa: N801 - reference class name kept for recognisability
    """Temporal x spatial sigmoid gates blended in through a zero-initialised `alpha`."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        r = max(4, channels // reduction)
        self.temporal_att = self._gate(channels, r, nn.AdaptiveAvgPool2d((None, 1)))
        self.spatial_att = self._gate(channels, r, nn.AdaptiveAvgPool2d((1, None)))
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @staticmethod
    def _gate(channels: int, reduced: int, pool: nn.Module) -> nn.Sequential:
        return nn.Sequential(
            pool,
            nn.Conv2d(channels, reduced, 1, bias=False),
            StreamBatchNorm2d(reduced),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduced, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.temporal_att(x) * self.spatial_att(x)
        return x + self.alpha * (y - x)


class LinearAttention(nn.Module):
    """Multi-head linear attention (phi = elu + 1) over time, independently per joint."""

    def __init__(self, channels: int, num_heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, v = x.shape
        h, d = self.num_heads, self.head_dim
        seq = x.permute(0, 3, 2, 1).reshape(b * v, t, c)
        qkv = self.qkv(seq)  # (BV, T, 3C): Q | K | V, head-major inside each
        # phi(z) = elu(z) + 1 on the contiguous Q|K slab before any permute (several times faster
        # than on the permuted views).
        qk = F.elu(qkv[..., : 2 * c]) + 1.0
        q = qk[..., :c].reshape(b * v, t, h, d).transpose(1, 2)  # (BV, H, T, D)
        k = qk[..., c:].reshape(b * v, t, h, d).transpose(1, 2)
        val = qkv[..., 2 * c :].reshape(b * v, t, h, d).transpose(1, 2)
        kv = k.transpose(-2, -1) @ val  # (BV, H, D, D)
        k_sum = k.sum(dim=2, keepdim=True)  # (BV, H, 1, D)
        num = q @ kv
        den = (q * k_sum).sum(dim=-1, keepdim=True).clamp(min=1e-4)
        out = (num / den).transpose(1, 2).reshape(b * v, t, c)
        out = self.dropout(self.proj(out))
        return out.reshape(b, v, t, c).permute(0, 3, 2, 1)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 9x1 temporal conv followed by a pointwise 1x1 conv, no activation between."""

    def __init__(self, channels: int, kernel_size: int = 9, stride: int = 1) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(
            channels, channels, (kernel_size, 1), stride=(stride, 1), padding=(pad, 0), groups=channels, bias=False
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


def _tcn(channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        StreamBatchNorm2d(channels),
        nn.ReLU(inplace=True),
        DepthwiseSeparableConv(channels, 9, stride),
        StreamBatchNorm2d(channels),
        nn.Dropout(0.1, inplace=True),
    )


class EffGCNBlock(nn.Module):
    """Graph conv -> BN/ReLU -> ST attention gate -> TCN or linear attention, plus residual."""

    def __init__(
        self, in_channels: int, out_channels: int, adjacency: Tensor, stride: int = 1, use_linear_attn: bool = False
    ) -> None:
        super().__init__()
        self.use_linear_attn = use_linear_attn
        self.stride = stride
        self.gcn = AdaptiveGraphConv(in_channels, out_channels, adjacency)
        self.gcn_bn = StreamBatchNorm2d(out_channels)
        self.gcn_relu = nn.ReLU(inplace=True)
        self.st_att = ST_JointAtt(out_channels, 4)
        self.tcn: nn.Module = LinearAttention(out_channels, 4) if use_linear_attn else _tcn(out_channels, stride)
        # Attention runs at full length; stride-2 attention blocks then average-pool (zero padding counted).
        self.attn_pool = (
            nn.AvgPool2d((3, 1), stride=(stride, 1), padding=(1, 0)) if use_linear_attn and stride > 1 else None
        )
        if in_channels == out_channels and stride == 1:
            self.residual_path: nn.Module = nn.Identity()
        else:
            self.residual_path = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=(stride, 1)), StreamBatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gcn_relu(self.gcn_bn(self.gcn(x)))
        h = self.tcn(self.st_att(h))
        if self.attn_pool is not None:
            h = self.attn_pool(h)
        return self.relu(h + self.residual_path(x))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """Stage layout of one LAST v2 size."""

    channels: tuple[int, int, int]
    blocks: tuple[int, int, int]
    strides: tuple[int, int, int]
    attention: tuple[bool, bool, bool]


VARIANTS: dict[str, VariantSpec] = {
    "small": VariantSpec((64, 128, 256), (3, 3, 4), (1, 2, 2), (False, False, True)),
    "base": VariantSpec((96, 192, 384), (4, 5, 5), (1, 2, 2), (False, True, True)),
    "large": VariantSpec((128, 256, 512), (6, 6, 6), (1, 2, 2), (False, True, True)),
}

StreamInput = Tensor | Mapping[str, Tensor]

# The files of a published student (Hugging Face layout; lastkd.student.publish writes them).
STUDENT_FORMAT = "lastkd-student/1"
STUDENT_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STREAM_BN_FILE = "stream_bn.safetensors"


class LASTv2(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="lastkd",
    tags=["skeleton-action-recognition", "ntu-rgbd", "knowledge-distillation"],
):
    """LAST v2 student: per-stream input BN, shared EffGCN backbone, linear head.

    A published student (``<registry>/<name>/v<N>/``, the Hugging Face layout: ``config.json``,
    ``model.safetensors``, ``README.md``) loads with ``LASTv2.from_pretrained(folder)``, strictly,
    in eval mode, with its per-stream BatchNorm statistics when it has them.

    Tensor input (N, C, T, V[, M]) -> raw logits through the joint input BN. Dict input
    {stream: tensor} -> ``log(mean_s softmax(logits_s) + 1e-8)``; stream names outside
    joint/velocity/bone use the joint input BN, as in the reference.
    """

    A: Tensor  # a buffer, declared so it types as a tensor

    def __init__(self, num_classes: int = 60, variant: str = "small", in_channels: int = 3) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown LAST v2 variant {variant!r}; expected one of {sorted(VARIANTS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 100_000:
            raise ValueError(f"num_classes must be an int in [1, 100000], got {num_classes!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or not 1 <= in_channels <= 64:
            raise ValueError(f"in_channels must be an int in [1, 64], got {in_channels!r}")
        spec = VARIANTS[variant]
        self.variant = variant
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = spec.channels[-1]

        self.register_buffer("A", build_ntu_spatial_adjacency())
        self.data_bn = nn.ModuleList(nn.BatchNorm2d(in_channels) for _ in STREAM_ORDER)
        blocks: list[nn.Module] = []
        c_prev = in_channels
        for c_out, n_blocks, stride, attn in zip(spec.channels, spec.blocks, spec.strides, spec.attention):
            for i in range(n_blocks):
                blocks.append(EffGCNBlock(c_prev, c_out, self.A, stride if i == 0 else 1, attn))
                c_prev = c_out
        self.backbone = nn.Sequential(*blocks)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # One pass in registration order, exactly like the reference, so that seed-0 init matches.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)

    # -- input handling ----------------------------------------------------------------------

    def _check_tensor(self, name: str, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"stream {name!r}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (4, 5):
            raise ValueError(f"stream {name!r}: expected shape (N, C, T, V) or (N, C, T, V, M), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"stream {name!r}: expected a floating-point tensor, got {x.dtype}")
        n, c, t, v = x.shape[:4]
        if c != self.in_channels or v != NUM_JOINTS or n < 1 or t < 1 or (x.dim() == 5 and x.shape[4] < 1):
            raise ValueError(
                f"stream {name!r}: expected (N>=1, C={self.in_channels}, T>=1, V={NUM_JOINTS}[, M>=1]), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _streams(self, x: StreamInput) -> list[tuple[int, Tensor]]:
        """(input-BN index, tensor) per stream, in the order given."""
        if isinstance(x, Tensor):
            return [(0, self._check_tensor("<tensor>", x))]
        if not isinstance(x, Mapping):
            raise TypeError(f"LASTv2 input must be a Tensor or a mapping of stream tensors, got {type(x).__name__}")
        if not x:
            raise ValueError("LASTv2 input dict is empty; expected at least one stream")
        out = []
        shape = None
        for name, tensor in x.items():
            tensor = self._check_tensor(str(name), tensor)
            if shape is None:
                shape = tensor.shape
            elif tensor.shape != shape:
                raise ValueError(f"stream {name!r} has shape {tuple(tensor.shape)}, other streams {tuple(shape)}")
            out.append((STREAM_ORDER.index(name) if name in STREAM_ORDER else 0, tensor))
        return out

    def _normalise(self, bn_index: int, x: Tensor) -> tuple[Tensor, int]:
        """(N, C, T, V[, M]) -> data-BN'd (N*M, C, T, V); row n*M + m is sample n, body m."""
        if x.dim() == 4:
            x = x.unsqueeze(-1)
        n, c, t, v, m = x.shape
        x = x.permute(0, 4, 1, 2, 3).reshape(n * m, c, t, v)
        return self.data_bn[bn_index](x), m

    # -- forward paths -----------------------------------------------------------------------

    def _run(self, x: StreamInput) -> tuple[list[Tensor], list[Tensor]]:
        """Per-stream logits (N, classes) and pooled features (N, M, C_last), in input order."""
        streams = self._streams(x)
        normed = [self._normalise(k, s) for k, s in streams]
        m = normed[0][1]
        n = normed[0][0].shape[0] // m
        if not self.training and self.has_stream_bn_stats():
            # Per-stream eval statistics: each stream is normalised with its own (as in training).
            pooled = []
            for (k, _), (h, _) in zip(streams, normed):
                with self.stream_context(k):
                    pooled.append(self.backbone(h).mean(dim=(2, 3)).reshape(n, m, -1))
            return [self._head(p) for p in pooled], pooled
        if self.training or len(normed) == 1:
            # Train mode: each stream is its own batch for every backbone BN, and streams run one
            # after the other (head included) so dropout draws the RNG in the reference order.
            pooled = []
            logits = []
            for h, _ in normed:
                pooled.append(self.backbone(h).mean(dim=(2, 3)).reshape(n, m, -1))
                logits.append(self._head(pooled[-1]))
            return logits, pooled
        # Eval BN is per-sample, so one backbone pass over all streams is equivalent and faster.
        joined = self.backbone(torch.cat([h for h, _ in normed], dim=0)).mean(dim=(2, 3))
        pooled = [p.reshape(n, m, -1) for p in joined.chunk(len(normed), dim=0)]
        return [self._head(p) for p in pooled], pooled

    # -- per-stream eval statistics ------------------------------------------------------------

    def stream_bns(self) -> dict[str, StreamBatchNorm2d]:
        """Every backbone BatchNorm by its state-dict prefix (``backbone.0.gcn_bn`` ...)."""
        return {
            f"backbone.{name}": mod for name, mod in self.backbone.named_modules() if isinstance(mod, StreamBatchNorm2d)
        }

    def has_stream_bn_stats(self) -> bool:
        """True when per-stream eval statistics are installed."""
        first = next(iter(self.stream_bns().values()))
        return first.stream_mean.shape[0] > 0

    def set_stream_bn_stats(self, stats: Mapping[str, Tensor] | None) -> None:
        """Install per-stream eval statistics ``{prefix.stream_mean|stream_var: (S, C)}``, S = 3 in
        ``STREAM_ORDER``; None removes them (reference behaviour). Raises ValueError (nothing is
        changed) when a key is missing or unknown or a shape does not fit."""
        bns = self.stream_bns()
        if stats is None:
            for bn in bns.values():
                bn.stream_mean = bn.stream_mean.new_empty(0, bn.num_features)
                bn.stream_var = bn.stream_var.new_empty(0, bn.num_features)
            return
        expected = {f"{p}.{b}" for p in bns for b in ("stream_mean", "stream_var")}
        missing, unexpected = sorted(expected - set(stats)), sorted(set(stats) - expected)
        if missing or unexpected:
            raise ValueError(f"per-stream BN statistics do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for prefix, bn in bns.items():
            for buf in ("stream_mean", "stream_var"):
                value = stats[f"{prefix}.{buf}"]
                if not isinstance(value, Tensor) or tuple(value.shape) != (len(STREAM_ORDER), bn.num_features):
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"{prefix}.{buf}: expected shape ({len(STREAM_ORDER)}, {bn.num_features}), got {shape}"
                    )
                if not torch.isfinite(value).all() or (buf == "stream_var" and (value < 0).any()):
                    raise ValueError(f"{prefix}.{buf}: non-finite or negative values")
        for prefix, bn in bns.items():
            ref = bn.running_mean
            bn.stream_mean = stats[f"{prefix}.stream_mean"].detach().to(ref.device, ref.dtype).clone()
            bn.stream_var = stats[f"{prefix}.stream_var"].detach().to(ref.device, ref.dtype).clone()

    def stream_bn_stats(self) -> dict[str, Tensor]:
        """The installed per-stream eval statistics (CPU copies), or {} when there are none."""
        if not self.has_stream_bn_stats():
            return {}
        out = {}
        for prefix, bn in self.stream_bns().items():
            out[f"{prefix}.stream_mean"] = bn.stream_mean.detach().cpu().clone()
            out[f"{prefix}.stream_var"] = bn.stream_var.detach().cpu().clone()
        return out

    @classmethod
    def _from_pretrained(  # the mixin's hook, with our strict defaults
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> LASTv2:
        """Build from ``config.json``, load ``model.safetensors`` strictly and install
        ``stream_bn.safetensors`` when present; eval mode. A folder, or a Hub repo id (cached)."""
        from safetensors.torch import load_file

        def fetch(name: str, required: bool = True) -> Path | None:
            if os.path.isdir(model_id):
                path = Path(model_id) / name
                if not path.is_file() and required:
                    raise FileNotFoundError(f"{model_id}: no {name}; not a published LAST v2 student")
                return path if path.is_file() else None
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                return Path(
                    hf_hub_download(
                        model_id,
                        name,
                        revision=revision,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        local_files_only=local_files_only,
                        token=token,
                    )
                )
            except EntryNotFoundError:
                if required:
                    raise
                return None

        config_path = fetch(STUDENT_CONFIG_FILE)
        assert config_path is not None
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or config.get("format") != STUDENT_FORMAT:
            raise ValueError(f"{config_path}: not a lastkd student description (format {STUDENT_FORMAT!r} expected)")
        # The mixin has already copied the init arguments it found in config.json into model_kwargs.
        init = {
            "num_classes": config.get("num_classes"),
            "variant": config.get("variant"),
            "in_channels": config.get("in_channels", 3),
            **model_kwargs,
        }
        model = cls(**init)
        weights = fetch(WEIGHTS_FILE)
        assert weights is not None
        model.load_state_dict(load_file(str(weights), device=map_location), strict=strict)
        stream_bn = fetch(STREAM_BN_FILE, required=False)
        if stream_bn is not None:
            model.set_stream_bn_stats(load_file(str(stream_bn)))
        return model.eval()

    @contextlib.contextmanager
    def stream_context(self, stream: int) -> Iterator[None]:
        """Select stream ``stream``'s eval statistics in every backbone BatchNorm for the block.

        Not re-entrant across threads: one model object serves one forward at a time here.
        """
        bns = list(self.stream_bns().values())
        for bn in bns:
            bn.stream = stream
        try:
            yield
        finally:
            for bn in bns:
                bn.stream = None

    def _head(self, pooled: Tensor) -> Tensor:
        """(N, M, C_last) pooled features -> (N, classes) logits averaged over bodies."""
        return self.fc(self.drop(pooled)).mean(dim=1)

    @staticmethod
    def _fuse(x: StreamInput, logits: list[Tensor]) -> Tensor:
        if isinstance(x, Tensor):
            return logits[0]
        prob = torch.softmax(logits[0], dim=-1)
        for extra in logits[1:]:
            prob = prob + torch.softmax(extra, dim=-1)
        return torch.log(prob / len(logits) + 1e-8)

    @staticmethod
    def _mean_feature(pooled: list[Tensor]) -> Tensor:
        return torch.stack(pooled, dim=0).mean(dim=(0, 2))

    def forward(self, x: StreamInput) -> Tensor:
        """Logits (tensor input) or fused log-probabilities (dict input), shape (N, num_classes)."""
        logits, _ = self._run(x)
        return self._fuse(x, logits)

    def forward_features(self, x: StreamInput) -> Tensor:
        """Pooled pre-classifier feature (N, feature_dim), averaged over bodies and streams."""
        return self._mean_feature(self._run(x)[1])

    def forward_with_features(self, x: StreamInput) -> tuple[Tensor, Tensor]:
        """``(forward(x), forward_features(x))`` from a single backbone pass."""
        logits, pooled = self._run(x)
        return self._fuse(x, logits), self._mean_feature(pooled)

    def forward_stream_features(self, x: StreamInput) -> list[Tensor]:
        """Per-stream pooled features, each (N, M, feature_dim), as the reference head receives them."""
        return self._run(x)[1]


def create_last_v2(variant: str = "small", num_classes: int = 60, in_channels: int = 3) -> LASTv2:
    """Build a LAST v2 student by variant name (see `VARIANTS`)."""
    return LASTv2(num_classes=num_classes, variant=variant, in_channels=in_channels)


def num_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "AdaptiveGraphConv",
    "DepthwiseSeparableConv",
    "EffGCNBlock",
    "LASTv2",
    "LinearAttention",
    "ST_JointAtt",
    "STREAM_ORDER",
    "StreamBatchNorm2d",
    "VARIANTS",
    "VariantSpec",
    "build_ntu_spatial_adjacency",
    "create_last_v2",
    "num_parameters",
]
