"""VideoMAE V2 video ViT (the frozen teacher), built from timm blocks.

One model family in one file, timm style: the model class, a small registry of sizes, a
``checkpoint_filter_fn`` that maps official / foreign checkpoints onto our parameter names, a
strict loader, and an exporter back to the official layout.

Semantics follow ``shared/specs/videomae_v2.md``: Conv3d tubelet embedding, a fixed 1-D
sinusoidal position table over the flat (t, i, j) token index, pre-norm blocks, no CLS token,
feature = ``fc_norm(mean of patch tokens)``.

Naming difference from the official checkpoints: timm's ``Attention`` holds one fused
``attn.qkv.bias`` of length 3D; official files hold ``attn.q_bias`` and ``attn.v_bias`` (the key
bias is implicitly zero). ``checkpoint_filter_fn`` fuses them as concat(q, 0, v) and
``export_official_state_dict`` splits them back out.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

__all__ = [
    "CheckpointError",
    "VideoMAEBlock",
    "VideoMAEv2",
    "MODEL_CONFIGS",
    "check_model_name",
    "create_videomae",
    "list_models",
    "checkpoint_filter_fn",
    "export_official_state_dict",
    "names_for_error",
    "sinusoid_position_table",
    "inference_context",
]

_logger = logging.getLogger(__name__)

HeadMode = Literal["auto", "keep", "drop", "replace"]
_HEAD_MODES = ("auto", "keep", "drop", "replace")
# Prefixes left by wrappers around the encoder; stripped once each, in this order.
_COMPILE_PREFIX = "_orig_mod."
_MODULE_PREFIXES = ("backbone.", "encoder.")
# How many key names an error message lists before summarising the rest as a count.
_MAX_NAMES_IN_ERROR = 12


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be loaded into the model as asked."""


# ----------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoid table (1, num_positions, dim), float32.

    Computed in float64 with the power form 10000^(2*floor(c/2)/dim) and only then cast, which
    reproduces the official table bit for bit (a float32 computation is off by up to 1.2e-4).
    """
    if num_positions <= 0 or dim <= 0:
        raise ValueError(f"position table needs positive sizes, got num_positions={num_positions}, dim={dim}")
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim, dtype=torch.int64) // 2)).to(torch.float64) / dim
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent).unsqueeze(0)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


class TubeletEmbed(nn.Module):
    """Conv3d tubelet embedding: (B, C, T, H, W) -> tokens (B, N, D), time slowest, columns fastest."""

    def __init__(
        self, img_size: int, patch_size: int, tubelet_size: int, num_frames: int, in_chans: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.grid_size = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, in_chans, num_frames, img_size, img_size)."""
        expected = f"(B, {self.in_chans}, {self.num_frames}, {self.img_size}, {self.img_size})"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor of shape {expected}, got {type(x).__name__}")
        if x.ndim != 5:
            raise ValueError(f"expected a 5-D input (B, C, T, H, W) = {expected}, got shape {tuple(x.shape)}")
        _, c, t, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} channels (RGB, layout B,C,T,H,W) = {expected}, "
                f"got shape {tuple(x.shape)}; (B, T, C, H, W) inputs must be permuted first"
            )
        if t != self.num_frames:
            raise ValueError(
                f"model was built for {self.num_frames} frames, got {t} (input shape {tuple(x.shape)}); "
                f"build it with num_frames={t} instead (must be a multiple of {self.tubelet_size})"
            )
        if h != self.img_size or w != self.img_size:
            raise ValueError(f"expected spatial size {self.img_size}x{self.img_size}, got {h}x{w}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point input, got dtype {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # A Conv3d whose stride equals its kernel is one GEMM over non-overlapping tubelets. Done
        # as unfold + linear it is ~2x faster on CPU than oneDNN's Conv3d, and the tokens come
        # out contiguous in (B, N, D): the conv's flatten(2).transpose(1, 2) view made every
        # later residual add and LayerNorm in the network work on (and copy) a strided tensor.
        b, c, t, h, w = x.shape
        pt, ps = self.tubelet_size, self.patch_size
        gt, gh, gw = t // pt, h // ps, w // ps
        patches = (
            x.reshape(b, c, gt, pt, gh, ps, gw, ps)
            .permute(0, 2, 4, 6, 1, 3, 5, 7)
            .reshape(b, gt * gh * gw, c * pt * ps * ps)
        )
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def _add_residual(out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + out``, written into ``out`` unless type promotion (autocast) needs a new tensor."""
    return out.add_(residual) if out.dtype == residual.dtype else out + residual


class VideoMAEBlock(Block):
    """timm's pre-norm ViT ``Block`` (same parameters, same training path) with a leaner inference path.

    Without autograd (``torch.inference_mode()`` / ``no_grad``), in eval mode and with fused
    attention, ``forward`` runs the same operations in the same order -- so the same numbers,
    bit for bit -- but with fewer full-size temporaries: the residual is added into the output
    of the projection GEMM in place, GELU runs in place on the fc1 output, and q/k/v stay
    strided views of the qkv GEMM output that SDPA reads directly (its output is already laid
    out as (B, N, heads, head_dim), so merging the heads is free). On a CPU every avoided
    allocation of a ~5-20 MB activation is a round of page faults and a pass over memory.
    """

    # timm's Block builds these; declared so the lean path below type-checks.
    attn: Attention
    mlp: Mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or self.training
            or attn_mask is not None
            or is_causal
            or not self.attn.fused_attn
            or not self._plain
        ):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, d = x.shape
        attn, mlp = self.attn, self.mlp
        rows = x.reshape(b * n, d)
        qkv = F.linear(self.norm1(x), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        heads = F.scaled_dot_product_attention(q, k, v)
        # x + proj(o): the GEMM writes bias + o @ W^T into a fresh tensor, the residual is added
        # in place (float addition commutes, so this equals timm's x + proj(o) exactly).
        y = _add_residual(
            torch.addmm(attn.proj.bias, heads.transpose(1, 2).reshape(b * n, d), attn.proj.weight.t()), rows
        )
        # Biases exist: _plain checked them (cast only tells the type checker).
        hidden = torch.addmm(cast(torch.Tensor, mlp.fc1.bias), self.norm2(y).view(b * n, d), mlp.fc1.weight.t())
        torch.ops.aten.gelu_(hidden)
        return _add_residual(torch.addmm(cast(torch.Tensor, mlp.fc2.bias), hidden, mlp.fc2.weight.t()), y).view(b, n, d)

    @property
    def _plain(self) -> bool:
        """True when the block has exactly the layers the inference path spells out."""
        attn, mlp = self.attn, self.mlp
        identity = (self.ls1, self.ls2, self.drop_path1, self.drop_path2, attn.q_norm, attn.k_norm, attn.norm, mlp.norm)
        return (
            all(isinstance(m, nn.Identity) for m in identity)
            and getattr(attn, "gate", None) is None
            and isinstance(mlp.act, nn.GELU)
            and mlp.act.approximate == "none"
            and all(m.bias is not None for m in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2))
        )


class VideoMAEv2(nn.Module):
    """VideoMAE V2 fine-tune ViT: tubelet embed + fixed sinusoid table + timm Blocks + mean pool + fc_norm.

    timm's naming: ``forward_features`` returns the patch tokens (B, N, embed_dim);
    ``forward_head(tokens, pre_logits=True)`` is the teacher feature (B, embed_dim) that the store
    keeps; ``forward`` adds the linear head (absent when ``num_classes == 0``, in which case
    ``forward`` returns the feature).
    """

    pos_embed: torch.Tensor  # a buffer (register_buffer), declared for type checkers

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_frames: int = 16,
        tubelet_size: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 710,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        init_scale: float = 0.001,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        ints = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_frames=num_frames,
            tubelet_size=tubelet_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
        )
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of tubelet_size {tubelet_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if not (isinstance(mlp_ratio, (int, float)) and math.isfinite(mlp_ratio) and mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        rates: dict[str, float] = dict(
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            head_drop_rate=head_drop_rate,
        )
        for key, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {rate!r}")

        self.config: dict[str, Any] = dict(ints, mlp_ratio=float(mlp_ratio), num_classes=num_classes)
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = "avg"
        self.num_frames = num_frames
        self.img_size = img_size

        self.patch_embed = TubeletEmbed(img_size, patch_size, tubelet_size, num_frames, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        # Not persistent: official checkpoints have no pos_embed and the table is a pure function
        # of (num_patches, embed_dim), so it is rebuilt for whatever frame count the model has.
        self.register_buffer("pos_embed", sinusoid_position_table(self.num_patches, embed_dim), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            [
                VideoMAEBlock(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    init_values=None,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,  # type: ignore[arg-type]  # timm only calls it: norm_layer(dim)
                    act_layer=nn.GELU,
                )
                for i in range(depth)
            ]
        )
        self.fc_norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)
        self._init_scale = init_scale
        self.set_fused_attn(fused_attn)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Same scheme as the official model; only matters for random-init (labelled) teachers.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every block between fused SDPA and the explicit softmax(q k^T) v path."""
        for blk in self.blocks:
            # timm marks fused_attn Final (set once from its config); switching it per model is
            # what timm's own set_fused_attn helpers do too.
            cast(VideoMAEBlock, blk).attn.fused_attn = bool(enabled)  # type: ignore[misc]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one (0 removes it). Pooling is always the
        token mean (``global_pool`` is accepted for timm's signature and must be None or 'avg')."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"VideoMAE V2 pools by the token mean only; global_pool={global_pool!r} is not supported")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.fc_norm.weight
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
            return
        head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        self._init_weights(head)
        with torch.no_grad():
            head.weight.mul_(self._init_scale)
            head.bias.mul_(self._init_scale)
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block patch tokens (B, N, D), no pooling (timm's meaning of the name)."""
        x = self.patch_embed(x)
        x = x + self.pos_embed.to(device=x.device, dtype=x.dtype)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> ``fc_norm(mean over tokens)`` (the teacher feature, with ``pre_logits=True``)
        -> logits (the identity when the model has no head)."""
        # Pooling and fc_norm in fp32 whatever the autocast: the mean of 1568 tokens and the
        # norm's statistics are where bf16's 8-bit mantissa costs most, and they are cheap.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 up; fp64 stays fp64
            x = self.fc_norm(x.mean(dim=1))
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher feature the store keeps, (B, embed_dim): ``forward_head(tokens, pre_logits=True)``."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "videomae_v2_vit_s": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "videomae_v2_vit_b": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "videomae_v2_vit_l": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "videomae_v2_vit_h": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "videomae_v2_vit_g": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
    # The golden-fixture configuration (shared/reference/videomae_v2_tiny_golden.pt).
    "videomae_v2_tiny": dict(patch_size=16, embed_dim=96, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10),
}
# Common to every size unless overridden; 710 = the Kinetics-710 head of the released checkpoints.
_BASE_CONFIG: dict[str, Any] = dict(img_size=224, in_chans=3, num_frames=16, tubelet_size=2, num_classes=710)
# The size-defining keys a caller may not override (it would silently be a different model).
_ARCH_KEYS = frozenset({"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"})


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODEL_CONFIGS)


def check_model_name(name: str) -> str:
    """``name`` when it is a registered model, else ValueError listing the known ones.

    The one model-name rule: the engine config (``lastkd embed``, ``lastkd serve-teacher``) checks
    it before anything is loaded, and :func:`create_videomae` again for direct callers.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown VideoMAE V2 model {name!r}; known: {', '.join(list_models())}")
    return name


def create_videomae(name: str, **overrides: Any) -> VideoMAEv2:
    """Build a registered VideoMAE V2 size, e.g. ``create_videomae("videomae_v2_vit_b", num_classes=0)``.

    Overrides may change the input geometry (num_frames, img_size, tubelet_size, in_chans), the head
    (num_classes; 0 = no head), drop rates, init_scale and fused_attn, but not the architecture size.
    """
    check_model_name(name)
    arch = sorted(_ARCH_KEYS & overrides.keys())
    if arch:
        raise ValueError(
            f"{', '.join(arch)} define the size of {name!r} and cannot be overridden; pick another registered size"
        )
    allowed = set(VideoMAEv2.__init__.__kwdefaults__ or {})
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(
            f"unknown option(s) for {name!r}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed - _ARCH_KEYS))}"
        )
    kwargs = {**_BASE_CONFIG, **MODEL_CONFIGS[name], **overrides}
    model = VideoMAEv2(**kwargs)
    model.config["name"] = name
    return model


# ----------------------------------------------------------------------------------------
# timm registration: timm.create_model("videomae_v2_vit_b", pretrained=True,
#     pretrained_cfg_overlay=dict(file="vit_b_k710_dl_from_giant.pth"))
# ----------------------------------------------------------------------------------------


def _cfg(num_classes: int = 710, **kwargs: Any) -> dict[str, Any]:
    # No download location: the official files are distributed by their authors on request / behind
    # a licence form, and this project never downloads weights. A local file is given with
    # pretrained_cfg_overlay=dict(file=...); it goes through checkpoint_filter_fn like any load.
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, 224, 224),  # timm describes images: 16 frames is the model's num_frames
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "cc-by-nc-4.0",
        "paper_ids": "arXiv:2303.16727",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "videomae_v2_vit_s.k710_distill_from_giant": _cfg(notes=("official file: vit_s_k710_dl_from_giant.pth",)),
        "videomae_v2_vit_b.k710_distill_from_giant": _cfg(notes=("official file: vit_b_k710_dl_from_giant.pth",)),
        "videomae_v2_vit_l": _cfg(),
        "videomae_v2_vit_h": _cfg(),
        "videomae_v2_vit_g.k710_ft": _cfg(notes=("official file: vit_g_hybrid_pt_1200e_k710_ft.pth",)),
        "videomae_v2_tiny": _cfg(num_classes=10, notes=("the golden-fixture size (shared/reference)",)),
    }
)


def _timm_filter(state_dict: Any, model: VideoMAEv2) -> OrderedDict[str, torch.Tensor]:
    # timm re-initialises a head whose class count differs from the checkpoint's: "replace" does that.
    return checkpoint_filter_fn(state_dict, model, head="replace")


def _create_timm(variant: str, pretrained: bool, **kwargs: Any) -> VideoMAEv2:
    return build_model_with_cfg(
        partial(create_videomae, variant), variant, pretrained, pretrained_filter_fn=_timm_filter, **kwargs
    )


@register_model
def videomae_v2_vit_s(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """VideoMAE V2 ViT-S/16, 16 frames x 224 (the official distilled small teacher)."""
    return _create_timm("videomae_v2_vit_s", pretrained, **kwargs)


@register_model
def videomae_v2_vit_b(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """VideoMAE V2 ViT-B/16, 16 frames x 224 (lastkd's teacher: vit_b_k710_dl_from_giant)."""
    return _create_timm("videomae_v2_vit_b", pretrained, **kwargs)


@register_model
def videomae_v2_vit_l(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """VideoMAE V2 ViT-L/16, 16 frames x 224."""
    return _create_timm("videomae_v2_vit_l", pretrained, **kwargs)


@register_model
def videomae_v2_vit_h(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """VideoMAE V2 ViT-H/16, 16 frames x 224."""
    return _create_timm("videomae_v2_vit_h", pretrained, **kwargs)


@register_model
def videomae_v2_vit_g(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """VideoMAE V2 ViT-g/14, 16 frames x 224 (the official giant)."""
    return _create_timm("videomae_v2_vit_g", pretrained, **kwargs)


@register_model
def videomae_v2_tiny(pretrained: bool = False, **kwargs: Any) -> VideoMAEv2:
    """The 2-block, 96-d golden-fixture size, for tests."""
    return _create_timm("videomae_v2_tiny", pretrained, **kwargs)


# ----------------------------------------------------------------------------------------
# checkpoint conversion
# ----------------------------------------------------------------------------------------


def names_for_error(keys: Any) -> str:
    """Up to a dozen names joined for an error message, the rest summarised as a count."""
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_NAMES_IN_ERROR])
    if len(keys) > _MAX_NAMES_IN_ERROR:
        shown += f", ... ({len(keys) - _MAX_NAMES_IN_ERROR} more)"
    return shown


def _unwrap(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The state dict inside an official wrapper: first of ``model`` / ``module``, else the object itself."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint is a {type(checkpoint).__name__}, not a dict of tensors")
    for key in ("model", "module"):
        if key in checkpoint:
            checkpoint = checkpoint[key]
            if not isinstance(checkpoint, Mapping):
                raise CheckpointError(f"checkpoint[{key!r}] is a {type(checkpoint).__name__}, not a state dict")
            break
    if not checkpoint:
        raise CheckpointError("checkpoint holds an empty state dict")
    bad = [k for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint is not a state dict: entries {names_for_error(map(repr, bad))} are not tensors "
            f"(a training save? weights are expected at the top level or under 'model' / 'module')"
        )
    return dict(checkpoint)


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_COMPILE_PREFIX):
            key = key[len(_COMPILE_PREFIX) :]
        for prefix in _MODULE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key in out:
            raise CheckpointError(f"checkpoint key {key!r} appears twice after stripping wrapper prefixes")
        out[key] = value
    return out


def _reject_pretrain(keys: list[str]) -> None:
    has_fc_norm = any(k.endswith("fc_norm.weight") for k in keys)
    decoder = [k for k in keys if k.startswith("decoder.") or ".decoder." in k]
    enc_norm = [k for k in keys if k.split("_orig_mod.")[-1].startswith("encoder.norm.")]
    if decoder or (enc_norm and not has_fc_norm):
        found = decoder[:3] + enc_norm[:2]
        raise CheckpointError(
            f"this is a VideoMAE V2 pre-training checkpoint (found {', '.join(found)}"
            f"{'' if has_fc_norm else ' and no fc_norm'}), not a fine-tuned/distilled classification "
            "checkpoint; the teacher needs a fine-tuned one such as vit_b_k710_dl_from_giant.pth"
        )


def _fuse_qv_bias(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace official ``attn.q_bias`` / ``attn.v_bias`` by timm's ``attn.qkv.bias`` = [q, 0, v]."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("attn.v_bias"):
            prefix = key[: -len("v_bias")]
            if prefix + "q_bias" not in state_dict:
                raise CheckpointError(f"checkpoint has {key} but no {prefix}q_bias")
            continue
        if not key.endswith("attn.q_bias"):
            out[key] = value
            continue
        prefix = key[: -len("q_bias")]
        v = state_dict.get(prefix + "v_bias")
        if v is None:
            raise CheckpointError(f"checkpoint has {key} but no {prefix}v_bias")
        if value.ndim != 1 or v.shape != value.shape:
            raise CheckpointError(
                f"{key} {tuple(value.shape)} and {prefix}v_bias {tuple(v.shape)} must be 1-D vectors of the same length"
            )
        if prefix + "qkv.bias" in state_dict:
            raise CheckpointError(f"checkpoint has both {key} and {prefix}qkv.bias; cannot tell which is meant")
        out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v.to(value.dtype)])
    return out


def checkpoint_filter_fn(state_dict: Any, model: VideoMAEv2, head: HeadMode = "auto") -> OrderedDict[str, torch.Tensor]:
    """Convert an official / foreign VideoMAE V2 checkpoint object into this model's state dict.

    * unwraps ``model`` / ``module`` (first present) or takes a bare state dict;
    * strips ``_orig_mod.`` then a leading ``backbone.`` / ``encoder.``;
    * rejects pre-training checkpoints (decoder, or encoder.norm without fc_norm);
    * fuses ``q_bias`` / ``v_bias`` into ``qkv.bias`` = [q, 0, v];
    * drops any stored ``pos_embed`` (the model's own fixed table is used; a different length,
      e.g. from another frame count, is noted in the log);
    * head: ``keep`` (shapes must match), ``drop`` (model must have no head; checkpoint head
      discarded), ``replace`` (keep the checkpoint head when it fits, otherwise keep the model's
      fresh head, with a log note), ``auto`` (``drop`` for a head-less model, else ``keep``);
    * casts floating tensors (e.g. fp16 storage) to the model's dtype.

    Keys come back in the model's state-dict order, followed by any the model does not know
    (the loader reports those as unexpected).
    """
    if head not in _HEAD_MODES:
        raise ValueError(f"head must be one of {', '.join(_HEAD_MODES)}, got {head!r}")
    raw = _unwrap(state_dict)
    _reject_pretrain(list(raw))
    sd = _fuse_qv_bias(_strip_prefixes(raw))

    stored_pos = sd.pop("pos_embed", None)
    if stored_pos is not None:
        if tuple(stored_pos.shape) == tuple(model.pos_embed.shape):
            _logger.info(
                "checkpoint pos_embed %s ignored: the model uses its fixed sinusoid table", tuple(stored_pos.shape)
            )
        else:
            _logger.warning(
                "checkpoint pos_embed %s does not match the model table %s (other frame count or a "
                "learnable table); ignored, the model's fixed sinusoid table is used",
                tuple(stored_pos.shape),
                tuple(model.pos_embed.shape),
            )

    own = model.state_dict()
    model_has_head = model.num_classes > 0
    ckpt_head = {k: sd[k] for k in ("head.weight", "head.bias") if k in sd}
    if head == "auto":
        head = "keep" if model_has_head else "drop"
    if head == "keep":
        if ckpt_head and not model_has_head:
            raise CheckpointError(
                f"checkpoint has a classification head ({', '.join(ckpt_head)}) but the model "
                "was built with num_classes=0; use head='drop' to discard it"
            )
        mismatched = [
            f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in ckpt_head.items()
            if k in own and v.shape != own[k].shape
        ]
        if mismatched:
            raise CheckpointError(
                f"classification head does not match: {'; '.join(mismatched)}; build the model "
                "with the checkpoint's num_classes, or use head='replace' (re-initialise) or "
                "head='drop' (num_classes=0)"
            )
    elif head == "drop":
        if model_has_head:
            raise CheckpointError(
                f"head='drop' needs a model built with num_classes=0, this one has "
                f"{model.num_classes} classes; use head='replace' to re-initialise its head"
            )
        for k in ckpt_head:
            del sd[k]
        if ckpt_head:
            _logger.info("checkpoint head (%s) dropped: the model has no head", ", ".join(ckpt_head))
    else:  # replace
        if not model_has_head:
            for k in ckpt_head:
                del sd[k]
            if ckpt_head:
                _logger.info("checkpoint head dropped (model has no head)")
        else:
            fits = set(ckpt_head) == {"head.weight", "head.bias"} and all(
                ckpt_head[k].shape == own[k].shape for k in ckpt_head
            )
            if not fits:
                shape = tuple(ckpt_head["head.weight"].shape) if "head.weight" in ckpt_head else None
                _logger.warning(
                    "checkpoint head %s does not fit the model head %s: the head is re-initialised",
                    shape,
                    tuple(own["head.weight"].shape),
                )
                for k in ckpt_head:
                    del sd[k]
                sd["head.weight"] = own["head.weight"].detach().clone()
                sd["head.bias"] = own["head.bias"].detach().clone()

    dtype = model.fc_norm.weight.dtype
    converted: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        converted[key] = value
    ordered: OrderedDict[str, torch.Tensor] = OrderedDict((k, converted.pop(k)) for k in own if k in converted)
    ordered.update(converted)
    return ordered


def keep_key_bias_zero(model: VideoMAEv2) -> None:
    """Make training leave the key slice of every ``attn.qkv.bias`` at zero, as the official model
    has it (``q_bias`` and ``v_bias`` only): its gradient is zeroed, so Adam(W) never moves it
    from the zero every load and init puts there, and the trained model still exports to the
    official layout. (A key bias shifts every attention logit of a query equally: softmax ignores
    it, so the official model loses nothing by not having one.)"""
    for block in model.blocks:
        bias = cast(nn.Linear, cast(VideoMAEBlock, block).attn.qkv).bias
        if bias is None:
            continue
        dim = int(bias.shape[0]) // 3

        def mask(grad: torch.Tensor, dim: int = dim) -> torch.Tensor:
            grad = grad.clone()
            grad[dim : 2 * dim] = 0
            return grad

        bias.register_hook(mask)


def export_official_state_dict(model: VideoMAEv2) -> OrderedDict[str, torch.Tensor]:
    """State dict in the official key names and order (``q_bias``/``v_bias`` before ``qkv.weight``).

    Raises ValueError when a block's key-bias slice is non-zero: the official layout has no k bias.
    """
    own = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in own.items():
        if key.endswith("attn.qkv.bias"):
            continue
        if key.endswith("attn.qkv.weight"):
            prefix = key[: -len("qkv.weight")]
            bias = own[prefix + "qkv.bias"]
            dim = bias.shape[0] // 3
            if torch.count_nonzero(bias[dim : 2 * dim]) != 0:
                raise ValueError(
                    f"{prefix}qkv.bias has a non-zero key slice; the official layout cannot hold "
                    "a key bias (it has no effect on outputs: zero it before exporting)"
                )
            out[prefix + "q_bias"] = bias[:dim].detach().clone()
            out[prefix + "v_bias"] = bias[2 * dim :].detach().clone()
        out[key] = value.detach()
    return out


# ----------------------------------------------------------------------------------------
# runtime helpers
# ----------------------------------------------------------------------------------------


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISIONS = ("auto", *_AUTOCAST_DTYPES)


def resolve_precision(spec: str, device: torch.device | str) -> str:
    """The precision the teacher runs in on ``device``: ``auto`` is bf16 on CUDA and fp32 on the
    CPU; ``fp16`` needs CUDA. What this returns names the feature set (vectors made in bf16 and
    in fp32 differ by ~4e-3 relative L2, so they never share a set)."""
    if spec not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    kind = torch.device(device).type
    if spec == "auto":
        return "bf16" if kind == "cuda" else "fp32"
    if spec == "fp16" and kind != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, not {kind!r} (use bf16 or fp32)")
    return spec


@contextlib.contextmanager
def inference_context(device: torch.device | str, dtype: str = "bf16") -> Iterator[None]:
    """``torch.inference_mode()`` plus autocast in ``bf16``/``fp16`` (on the device's type);
    plain fp32 with ``fp32``. Give it a resolved precision (:func:`resolve_precision`)."""
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_AUTOCAST_DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    amp_dtype = _AUTOCAST_DTYPES[dtype]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if amp_dtype is not None:
            stack.enter_context(torch.autocast(device_type=device.type, dtype=amp_dtype))
        yield
