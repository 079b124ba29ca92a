"""VideoMAE V2 teacher: golden equality with the original model, checkpoint conversion, export."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

from lastkd.hashing import sha256_file
from lastkd.models.checkpoint_io import load_checkpoint, save_official
from lastkd.models.videomae import (
    MODEL_CONFIGS,
    CheckpointError,
    VideoMAEv2,
    checkpoint_filter_fn,
    create_videomae,
    export_official_state_dict,
    inference_context,
    list_models,
    resolve_precision,
)
from tests.support.paths import REFERENCE

torch.set_num_threads(min(2, torch.get_num_threads()))

GOLDEN = REFERENCE / "videomae_v2_tiny_golden.pt"
GOLDEN_8F = REFERENCE / "videomae_v2_tiny_golden_8f.pt"
VIT_B_SHAPES = REFERENCE / "videomae_v2_vit_b_state_dict_shapes.json"
LOGGER = "lastkd.models.videomae"

# Tolerances from shared/reference/README.md (VideoMAE part).
FEATURE_ATOL = 2e-6
LOGIT_ATOL = 1e-6
INTERMEDIATE_ATOL = 1e-5
FLOAT64_ATOL = 1e-7

# Measured errors, printed with `pytest -s` (for the report; assertions use the tolerances).
MEASURED: dict[str, float] = {}


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    if MEASURED:
        print("\nVideoMAE V2 measured max abs errors:", json.dumps(MEASURED))


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden8() -> dict:
    return torch.load(GOLDEN_8F, map_location="cpu", weights_only=True)


@pytest.fixture()
def official_sd(golden: dict) -> OrderedDict:
    """A fresh copy of the golden official-layout state dict (q_bias/v_bias names)."""
    return OrderedDict((k, v.clone()) for k, v in golden["checkpoint"]["module"].items())


def _tiny(**overrides) -> VideoMAEv2:
    return create_videomae("videomae_v2_tiny", **overrides).eval()


def _run(model: VideoMAEv2, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        tokens = model.forward_features(x)
        return model.forward_head(tokens, pre_logits=True), model.forward_head(tokens)


def _save_pth(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------------------------
# golden equivalence
# --------------------------------------------------------------------------------------------


def test_golden_16_frames_features_logits_intermediates(golden: dict) -> None:
    model = _tiny()
    model.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], model), strict=True)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone())
        )
        for name in ("patch_embed", "blocks.0", "blocks.1")
    ]
    feats, logits = _run(model, golden["input"])
    for h in hooks:
        h.remove()

    assert torch.equal(model.pos_embed, golden["pos_embed"])
    assert feats.shape == (1, 96) and logits.shape == (1, 10)
    MEASURED["features_16f"] = _max_err(feats, golden["features"])
    MEASURED["logits_16f"] = _max_err(logits, golden["logits"])
    assert MEASURED["features_16f"] <= FEATURE_ATOL
    assert MEASURED["logits_16f"] <= LOGIT_ATOL
    for name in ("patch_embed", "blocks.0", "blocks.1"):
        err = _max_err(captured[name], golden["intermediates"][name])
        MEASURED[f"intermediate_{name}"] = err
        assert err <= INTERMEDIATE_ATOL, name
    # forward() is head(forward_features()).
    with torch.no_grad():
        assert torch.equal(model(golden["input"]), logits)


def test_golden_8_frames_same_weights(golden8: dict) -> None:
    model = _tiny(num_frames=8)
    assert model.num_patches == 784
    model.load_state_dict(checkpoint_filter_fn(golden8["checkpoint"], model), strict=True)
    assert torch.equal(model.pos_embed, golden8["pos_embed"])
    feats, logits = _run(model, golden8["input"])
    MEASURED["features_8f"] = _max_err(feats, golden8["features"])
    MEASURED["logits_8f"] = _max_err(logits, golden8["logits"])
    assert MEASURED["features_8f"] <= FEATURE_ATOL
    assert MEASURED["logits_8f"] <= LOGIT_ATOL


def test_8_frame_table_is_prefix_of_16_frame_table(golden: dict, golden8: dict) -> None:
    assert torch.equal(_tiny(num_frames=8).pos_embed, golden["pos_embed"][:, :784])
    assert torch.equal(golden8["pos_embed"], golden["pos_embed"][:, :784])


@pytest.mark.parametrize("fused", [True, False], ids=["fused_sdpa", "explicit_softmax"])
def test_float64_run_matches_float64_reference(golden: dict, fused: bool) -> None:
    model = _tiny(fused_attn=fused)
    model.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], model), strict=True)
    model = model.double()
    feats, logits = _run(model, golden["input"].double())
    assert feats.dtype == torch.float64
    MEASURED[f"features_float64_{'fused' if fused else 'explicit'}"] = _max_err(feats, golden["features_float64"])
    assert _max_err(feats, golden["features_float64"]) <= FLOAT64_ATOL
    assert _max_err(logits, golden["logits_float64"]) <= FLOAT64_ATOL


def test_explicit_attention_is_bitwise_with_reference(golden: dict) -> None:
    model = _tiny(fused_attn=False)
    model.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], model), strict=True)
    feats, logits = _run(model, golden["input"])
    MEASURED["features_16f_explicit"] = _max_err(feats, golden["features"])
    assert MEASURED["features_16f_explicit"] <= FEATURE_ATOL
    assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL


def test_inference_path_is_bitwise_the_timm_block_path(golden: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd the blocks run their own lean path; with autograd, timm's Block.forward.
    Both must give the same numbers exactly, for one clip and for a batch."""
    model = _tiny()
    model.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], model), strict=True)
    x = torch.cat([golden["input"], golden["input"].flip(-1)])
    with torch.enable_grad():
        timm_path = model.embed(x).detach()
    timm_forward = timm.models.vision_transformer.Block.forward

    def _no_timm(*args, **kwargs):
        raise AssertionError("the inference path fell back to timm's Block.forward")

    monkeypatch.setattr(timm.models.vision_transformer.Block, "forward", _no_timm)
    with torch.inference_mode():
        lean = model.embed(x)
        single = model.embed(x[1:])
    monkeypatch.setattr(timm.models.vision_transformer.Block, "forward", timm_forward)
    assert torch.equal(lean, timm_path)
    assert torch.allclose(single, lean[1:], atol=1e-6, rtol=0)  # batch rows are independent
    assert _max_err(lean[:1], golden["features"]) <= FEATURE_ATOL
    # Training mode, or the explicit-softmax attention, always take timm's path.
    with pytest.raises(AssertionError, match="fell back"):
        monkeypatch.setattr(timm.models.vision_transformer.Block, "forward", _no_timm)
        with torch.inference_mode():
            _tiny(fused_attn=False).embed(x)


def test_patch_embed_gemm_equals_conv3d(golden: dict) -> None:
    """The tubelet embedding is computed as one GEMM; it must be the Conv3d it stands for."""
    model = _tiny(num_frames=8).double()
    x = torch.randn(2, 3, 8, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    proj = model.patch_embed.proj
    conv = torch.nn.functional.conv3d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    with torch.no_grad():
        tokens = model.patch_embed(x)
    assert tokens.shape == (2, 784, 96) and tokens.is_contiguous()
    assert _max_err(tokens, conv) <= 1e-12


def test_pos_embed_is_a_non_persistent_buffer() -> None:
    model = _tiny()
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in model.state_dict()
    assert not any("pos_embed" in name for name, _ in model.named_parameters())
    assert not model.pos_embed.requires_grad


# --------------------------------------------------------------------------------------------
# loading checkpoint files
# --------------------------------------------------------------------------------------------


def test_load_checkpoint_file_strict_returns_sha256(tmp_path: Path, golden: dict) -> None:
    path = _save_pth(golden["checkpoint"], tmp_path / "tiny.pth")
    model = _tiny()
    digest = load_checkpoint(model, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest
    feats, logits = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
    assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL


@pytest.mark.parametrize("wrapper", ["model", "module", "bare", "model_with_extras"])
def test_wrappers(tmp_path: Path, golden: dict, official_sd: OrderedDict, wrapper: str) -> None:
    obj = {
        "bare": official_sd,
        "model": {"model": official_sd},
        "module": {"module": official_sd},
        "model_with_extras": {"model": official_sd, "epoch": 7, "module": {"x": torch.zeros(1)}},
    }[wrapper]
    model = _tiny()
    load_checkpoint(model, _save_pth(obj, tmp_path / "w.pt"))
    feats, _ = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL


@pytest.mark.parametrize("prefix", ["_orig_mod.", "backbone.", "encoder.", "_orig_mod.backbone."])
def test_prefixes_are_stripped(tmp_path: Path, golden: dict, official_sd: OrderedDict, prefix: str) -> None:
    prefixed = OrderedDict((prefix + k, v) for k, v in official_sd.items())
    model = _tiny()
    load_checkpoint(model, _save_pth({"model": prefixed}, tmp_path / "p.pth"))
    feats, logits = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
    assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL


def test_qv_bias_fused_as_q_zero_v(official_sd: OrderedDict) -> None:
    model = _tiny()
    sd = checkpoint_filter_fn(official_sd, model)
    assert "blocks.0.attn.q_bias" not in sd and "blocks.0.attn.v_bias" not in sd
    bias = sd["blocks.0.attn.qkv.bias"]
    assert torch.equal(bias[:96], official_sd["blocks.0.attn.q_bias"])
    assert torch.equal(bias[96:192], torch.zeros(96))
    assert torch.equal(bias[192:], official_sd["blocks.0.attn.v_bias"])
    assert list(sd) == list(model.state_dict())


def test_missing_keys_named_and_model_untouched(tmp_path: Path, official_sd: OrderedDict) -> None:
    del official_sd["blocks.1.mlp.fc2.weight"]
    del official_sd["fc_norm.bias"]
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing keys") as exc:
        load_checkpoint(model, _save_pth({"module": official_sd}, tmp_path / "m.pth"))
    assert "blocks.1.mlp.fc2.weight" in str(exc.value) and "fc_norm.bias" in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unexpected_keys_named_and_non_strict_loads(
    tmp_path: Path, golden: dict, official_sd: OrderedDict, caplog
) -> None:
    official_sd["blocks.2.norm1.weight"] = torch.ones(96)
    official_sd["cls_token"] = torch.zeros(1, 1, 96)
    path = _save_pth({"module": official_sd}, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="unexpected keys") as exc:
        load_checkpoint(_tiny(), path)
    assert "blocks.2.norm1.weight" in str(exc.value) and "cls_token" in str(exc.value)

    model = _tiny()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_checkpoint(model, path, strict=False)
    assert "cls_token" in caplog.text
    feats, _ = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL


def test_wrong_shapes_named(tmp_path: Path, official_sd: OrderedDict) -> None:
    official_sd["fc_norm.weight"] = torch.ones(95)
    official_sd["blocks.0.attn.qkv.weight"] = torch.zeros(288, 95)
    with pytest.raises(CheckpointError, match="wrong shapes") as exc:
        load_checkpoint(_tiny(), _save_pth(official_sd, tmp_path / "s.pth"))
    msg = str(exc.value)
    assert "fc_norm.weight: checkpoint (95,) vs model (96,)" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (288, 95) vs model (288, 96)" in msg


def test_wrong_model_size_gives_clear_error(tmp_path: Path, official_sd: OrderedDict) -> None:
    # A depth-2 checkpoint into a model of another size: every mismatch is reported, nothing loads.
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(
            VideoMAEv2(embed_dim=96, depth=3, num_heads=4, num_classes=10), _save_pth(official_sd, tmp_path / "d.pth")
        )


class TestHeadModes:
    def test_keep_mismatch_is_an_error(self, tmp_path: Path, official_sd: OrderedDict) -> None:
        path = _save_pth(official_sd, tmp_path / "h.pth")
        with pytest.raises(CheckpointError, match=r"head\.weight \(10, 96\) vs model \(5, 96\)"):
            load_checkpoint(_tiny(num_classes=5), path, head="keep")

    def test_keep_into_headless_model_is_an_error(self, tmp_path: Path, official_sd: OrderedDict) -> None:
        with pytest.raises(CheckpointError, match="num_classes=0"):
            load_checkpoint(_tiny(num_classes=0), _save_pth(official_sd, tmp_path / "h.pth"), head="keep")

    @pytest.mark.parametrize("mode", ["drop", "auto", "replace"])
    def test_headless_model(self, tmp_path: Path, golden: dict, official_sd: OrderedDict, mode: str) -> None:
        model = _tiny(num_classes=0)
        load_checkpoint(model, _save_pth(official_sd, tmp_path / "h.pth"), head=mode)
        assert not any(k.startswith("head.") for k in model.state_dict())
        feats, out = _run(model, golden["input"])
        assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
        assert torch.equal(out, feats)  # no head: the logits are the pooled feature

    def test_drop_into_model_with_head_is_an_error(self, tmp_path: Path, official_sd: OrderedDict) -> None:
        with pytest.raises(CheckpointError, match="head='drop' needs a model built with num_classes=0"):
            load_checkpoint(_tiny(num_classes=10), _save_pth(official_sd, tmp_path / "h.pth"), head="drop")

    def test_replace_reinitialises_mismatched_head(
        self, tmp_path: Path, golden: dict, official_sd: OrderedDict, caplog
    ) -> None:
        model = _tiny(num_classes=5)
        fresh_head = model.head.weight.detach().clone()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            load_checkpoint(model, _save_pth(official_sd, tmp_path / "h.pth"), head="replace")
        assert "re-initialised" in caplog.text
        assert torch.equal(model.head.weight, fresh_head)
        feats, logits = _run(model, golden["input"])
        assert logits.shape == (1, 5)
        assert _max_err(feats, golden["features"]) <= FEATURE_ATOL

    def test_replace_keeps_fitting_head(self, tmp_path: Path, golden: dict, official_sd: OrderedDict) -> None:
        model = _tiny()
        load_checkpoint(model, _save_pth(official_sd, tmp_path / "h.pth"), head="replace")
        _, logits = _run(model, golden["input"])
        assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL

    def test_bad_head_mode(self, official_sd: OrderedDict) -> None:
        with pytest.raises(ValueError, match="head must be one of"):
            checkpoint_filter_fn(official_sd, _tiny(), head="reuse")


def test_stored_pos_embed_of_other_length_is_ignored(
    tmp_path: Path, golden: dict, golden8: dict, official_sd: OrderedDict, caplog
) -> None:
    # A checkpoint carrying a 16-frame table (1568 rows) loads into the 8-frame model; its own
    # 784-row table is kept.
    official_sd["pos_embed"] = golden["pos_embed"].clone()
    model = _tiny(num_frames=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_checkpoint(model, _save_pth({"model": official_sd}, tmp_path / "pe.pth"))
    assert "pos_embed" in caplog.text and "ignored" in caplog.text
    assert torch.equal(model.pos_embed, golden8["pos_embed"])
    feats, logits = _run(model, golden8["input"])
    assert _max_err(feats, golden8["features"]) <= FEATURE_ATOL
    assert _max_err(logits, golden8["logits"]) <= LOGIT_ATOL


def test_stored_learnable_table_is_not_used(tmp_path: Path, golden: dict, official_sd: OrderedDict) -> None:
    official_sd["pos_embed"] = torch.full((1, 1568, 96), 5.0)
    model = _tiny()
    load_checkpoint(model, _save_pth(official_sd, tmp_path / "pe.pth"))
    assert torch.equal(model.pos_embed, golden["pos_embed"])


def test_fp16_checkpoint_upcast_exactly(tmp_path: Path, official_sd: OrderedDict) -> None:
    half = OrderedDict((k, v.half()) for k, v in official_sd.items())
    model = _tiny()
    load_checkpoint(model, _save_pth({"model": half}, tmp_path / "fp16.pth"))
    got = export_official_state_dict(model)
    for key, value in half.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value.float()), key


def test_safetensors_round_trip(tmp_path: Path, golden: dict, official_sd: OrderedDict) -> None:
    source = _tiny()
    source.load_state_dict(checkpoint_filter_fn(official_sd, source))
    path = tmp_path / "tiny.safetensors"
    digest = save_official(source, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    stored = load_safetensors_file(path)
    assert set(stored) == set(official_sd)
    assert all(torch.equal(stored[k], official_sd[k]) for k in official_sd)

    model = _tiny()
    assert load_checkpoint(model, path) == digest
    feats, logits = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
    assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL


def test_pth_round_trip_via_save_official(tmp_path: Path, golden: dict, official_sd: OrderedDict) -> None:
    source = _tiny()
    source.load_state_dict(checkpoint_filter_fn(official_sd, source))
    path = tmp_path / "out" / "tiny.pth"
    digest = save_official(source, path)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.pth"]  # no temporary file left behind
    # the same weights are the same bytes wherever and whenever they are saved (the sha256 names sets)
    assert save_official(source, tmp_path / "again" / "other.pth") == digest
    saved = torch.load(path, weights_only=True)
    assert list(saved["model"]) == list(official_sd)
    model = _tiny()
    load_checkpoint(model, path)
    feats, _ = _run(model, golden["input"])
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL


def test_save_official_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        save_official(_tiny(), tmp_path / "w.bin")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# bad files and bad state dicts
# --------------------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    for name in ("empty.pth", "empty.safetensors"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match="empty"):
            load_checkpoint(_tiny(), tmp_path / name)


def test_truncated_pth(tmp_path: Path, golden: dict) -> None:
    full = _save_pth(golden["checkpoint"], tmp_path / "full.pth").read_bytes()
    for cut in (len(full) // 2, 100, len(full) - 10):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
            load_checkpoint(_tiny(), bad)


def test_truncated_and_garbage_safetensors(tmp_path: Path, official_sd: OrderedDict) -> None:
    good = tmp_path / "good.safetensors"
    save_safetensors_file(dict(official_sd), good)
    data = good.read_bytes()
    cases = {
        "trunc.safetensors": data[: len(data) // 2],
        "head.safetensors": data[:5],
        "text.safetensors": b"this is not a checkpoint\n" * 10,
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(_tiny(), tmp_path / name)


def test_garbage_and_non_checkpoint_pth(tmp_path: Path) -> None:
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_checkpoint(_tiny(), tmp_path / "noise.pth")
    for name, obj, pattern in [
        ("list.pth", [torch.zeros(2)], "not a dict of tensors"),
        ("tensor.pth", torch.zeros(3), "not a dict of tensors"),
        ("epoch.pth", {"epoch": 3, "lr": 0.1}, "not tensors"),
        ("emptydict.pth", {}, "empty state dict"),
        ("nested.pth", {"model": [1, 2]}, "not a state dict"),
    ]:
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(_tiny(), _save_pth(obj, tmp_path / name))


def test_missing_path_directory_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(_tiny(), tmp_path / "nope.pth")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(_tiny(), tmp_path / "dir.pth")
    (tmp_path / "w.txt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="suffix"):
        load_checkpoint(_tiny(), tmp_path / "w.txt")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_namespace_refused_with_fix(tmp_path: Path, official_sd: OrderedDict, zip_format: bool) -> None:
    path = tmp_path / "train_save.pth"
    torch.save(
        {"model": official_sd, "args": argparse.Namespace(lr=1e-3), "epoch": 3},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(model, path)
    msg = str(exc.value)
    assert "argparse.Namespace" in msg and "weights_only=True" in msg and "re-save" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pretrain_checkpoint_rejected(official_sd: OrderedDict) -> None:
    pretrain = OrderedDict(("encoder." + k, v) for k, v in official_sd.items() if not k.startswith(("fc_norm", "head")))
    pretrain["encoder.norm.weight"] = torch.ones(96)
    pretrain["encoder.norm.bias"] = torch.zeros(96)
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        checkpoint_filter_fn({"model": pretrain}, _tiny())
    pretrain["decoder.blocks.0.norm1.weight"] = torch.ones(96)
    with pytest.raises(CheckpointError, match="decoder"):
        checkpoint_filter_fn({"model": pretrain}, _tiny())


def test_half_of_a_bias_pair_is_an_error(official_sd: OrderedDict) -> None:
    del official_sd["blocks.1.attn.v_bias"]
    with pytest.raises(CheckpointError, match="blocks.1.attn.v_bias"):
        checkpoint_filter_fn(official_sd, _tiny())


def test_non_finite_weights_rejected(tmp_path: Path, official_sd: OrderedDict) -> None:
    official_sd["blocks.0.mlp.fc1.weight"][3, 4] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf.*blocks.0.mlp.fc1.weight"):
        load_checkpoint(_tiny(), _save_pth(official_sd, tmp_path / "nan.pth"))


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def test_tiny_export_equals_golden_checkpoint(official_sd: OrderedDict) -> None:
    model = _tiny()
    model.load_state_dict(checkpoint_filter_fn({"module": official_sd}, model), strict=True)
    exported = export_official_state_dict(model)
    assert list(exported) == list(official_sd)
    for key, value in official_sd.items():
        assert exported[key].shape == value.shape and torch.equal(exported[key], value), key


def test_export_refuses_non_zero_key_bias() -> None:
    model = _tiny()
    with torch.no_grad():
        model.blocks[1].attn.qkv.bias[100] = 0.5
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias has a non-zero key slice"):
        export_official_state_dict(model)


@pytest.fixture(scope="module")
def vit_b() -> VideoMAEv2:
    return create_videomae("videomae_v2_vit_b", num_classes=710).eval()


def test_vit_b_export_matches_reference_layout(vit_b: VideoMAEv2) -> None:
    reference = json.loads(VIT_B_SHAPES.read_text())
    exported = export_official_state_dict(vit_b)
    assert list(exported) == list(reference["state_dict"])
    assert {k: list(v.shape) for k, v in exported.items()} == {k: list(v) for k, v in reference["state_dict"].items()}
    assert sum(v.numel() for v in exported.values()) == reference["num_params_total"] == 86_773_190
    assert vit_b.embed_dim == 768
    assert "pos_embed" not in vit_b.state_dict()
    assert list(vit_b.pos_embed.shape) == reference["not_in_state_dict"]["pos_embed"]
    # Our own parameters add only the explicit zero key bias (768 per block).
    assert sum(p.numel() for p in vit_b.parameters()) == 86_773_190 + 12 * 768


def test_vit_b_embed(vit_b: VideoMAEv2) -> None:
    x = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0))
    with inference_context(torch.device("cpu")):
        feats = vit_b.embed(x)
    assert feats.shape == (1, 768) and feats.dtype == torch.float32
    assert bool(torch.isfinite(feats).all())


# --------------------------------------------------------------------------------------------
# input validation, registry, runtime helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((1, 3, 8, 224, 224), "built for 16 frames, got 8"),
        ((1, 3, 16, 160, 160), "spatial size 224x224"),
        ((1, 16, 3, 224, 224), "expected 3 channels"),
        ((3, 16, 224, 224), "5-D input"),
    ],
)
def test_bad_input_shapes(shape: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _tiny().forward_features(torch.zeros(shape))


def test_registry_names_and_sizes() -> None:
    names = list_models()
    assert names == sorted(
        [
            "videomae_v2_vit_s",
            "videomae_v2_vit_b",
            "videomae_v2_vit_l",
            "videomae_v2_vit_h",
            "videomae_v2_vit_g",
            "videomae_v2_tiny",
        ]
    )
    # Registered with timm under the same names, and no clash with timm's own models.
    assert set(timm.list_models("videomae_v2_*")) == set(names)
    assert all(timm.models.get_pretrained_cfg(n) is not None for n in names)
    # Sizes from the spec table (1.2).
    expected = {
        "videomae_v2_vit_s": (16, 384, 12, 6),
        "videomae_v2_vit_b": (16, 768, 12, 12),
        "videomae_v2_vit_l": (16, 1024, 24, 16),
        "videomae_v2_vit_h": (16, 1280, 32, 16),
        "videomae_v2_vit_g": (14, 1408, 40, 16),
    }
    for name, (patch, dim, depth, heads) in expected.items():
        cfg = MODEL_CONFIGS[name]
        assert (cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (patch, dim, depth, heads)
    giant = MODEL_CONFIGS["videomae_v2_vit_g"]
    assert round(giant["embed_dim"] * giant["mlp_ratio"]) == 6144
    tiny = _tiny()
    assert (tiny.embed_dim, len(tiny.blocks), tiny.num_classes, tiny.num_frames) == (96, 2, 10, 16)


def test_registry_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="unknown VideoMAE V2 model 'vit_base_patch16_224'"):
        create_videomae("vit_base_patch16_224")
    with pytest.raises(ValueError, match="embed_dim define the size"):
        create_videomae("videomae_v2_tiny", embed_dim=128)
    with pytest.raises(TypeError, match="unknown option"):
        create_videomae("videomae_v2_tiny", use_cls=True)
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        create_videomae("videomae_v2_tiny", num_frames=7)
    with pytest.raises(ValueError, match="num_classes"):
        create_videomae("videomae_v2_tiny", num_classes=-1)


def test_auto_precision_on_cpu_is_fp32_inference_mode(golden: dict) -> None:
    model = _tiny()
    model.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], model))
    precision = resolve_precision("auto", torch.device("cpu"))
    assert precision == "fp32"
    with inference_context(torch.device("cpu"), dtype=precision):
        assert torch.is_inference_mode_enabled()
        feats = model.embed(golden["input"])
    assert feats.dtype == torch.float32 and feats.is_inference()
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
    with pytest.raises(ValueError, match="dtype must be one of"):
        with inference_context("cpu", dtype="int8"):
            pass


# --------------------------------------------------------------------------------------------
# timm: create_model with a local official file, timm's method names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_create_model_loads_an_official_file(tmp_path: Path, golden: dict, suffix: str) -> None:
    path = tmp_path / f"official{suffix}"
    if suffix == ".pth":
        torch.save(golden["checkpoint"], path)  # the official wrapper: {"module": q_bias/v_bias names}
    else:
        source = _tiny()
        source.load_state_dict(checkpoint_filter_fn(golden["checkpoint"], source))
        save_official(source, path)
    model = timm.create_model("videomae_v2_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert isinstance(model, VideoMAEv2) and model.pretrained_cfg["architecture"] == "videomae_v2_tiny"
    with torch.no_grad():
        tokens = model.forward_features(golden["input"])
        feats = model.forward_head(tokens, pre_logits=True)
        logits = model(golden["input"])
    assert tokens.shape == (1, model.num_patches, 96)
    assert _max_err(feats, golden["features"]) <= FEATURE_ATOL
    assert _max_err(logits, golden["logits"]) <= LOGIT_ATOL
    # A head-less model from the same file gives the stored feature as its output.
    headless = timm.create_model(
        "videomae_v2_tiny", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    with torch.no_grad():
        assert _max_err(headless(golden["input"]), golden["features"]) <= FEATURE_ATOL


def test_timm_create_model_refuses_a_pretraining_checkpoint(tmp_path: Path, official_sd: OrderedDict) -> None:
    official_sd["decoder.blocks.0.norm1.weight"] = torch.ones(96)
    path = _save_pth({"model": official_sd}, tmp_path / "pt.pth")
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        timm.create_model("videomae_v2_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_reset_classifier_takes_timms_signature() -> None:
    model = _tiny()
    model.reset_classifier(3, global_pool="avg")
    assert model.num_classes == 3 and model.head.out_features == 3
    with pytest.raises(ValueError, match="token mean"):
        model.reset_classifier(3, global_pool="token")
