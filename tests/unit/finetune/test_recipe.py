"""The official fine-tuning recipe's pieces: layer-decay groups, the schedule, mixup/cutmix, the
person box and the config's refusals."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lastkd.finetune.clips import random_window
from lastkd.finetune.config import FinetuneConfig, FinetuneConfigError
from lastkd.finetune.optim import lr_at, mix_batch, param_groups, soft_cross_entropy
from lastkd.models.videomae import create_videomae
from lastkd.ntu.skeleton import COLOR_FRAME, person_box


def test_layer_decay_groups_follow_the_official_layer_ids() -> None:
    model = create_videomae("videomae_v2_vit_b", num_classes=7)
    depth = len(model.blocks)
    groups = param_groups(model, depth, weight_decay=0.05, layer_decay=0.75)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the patch embedding trains at lr x 0.75^(depth+1), block i at 0.75^(depth-i), the head at lr x 1
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** (depth + 1))
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75**depth)
    assert by_name["blocks.11.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75)
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["fc_norm.weight"]["lr_scale"] == 1.0
    # no weight decay on biases and norms; 0.05 on matrices
    assert by_name["head.bias"]["weight_decay"] == 0.0 and by_name["blocks.3.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["blocks.3.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["blocks.3.attn.proj.weight"]["weight_decay"] == 0.05
    assert by_name["patch_embed.proj.weight"]["weight_decay"] == 0.05
    # AdamW takes the groups as they are
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-3)
    assert len(opt.param_groups) == len(groups)


def test_warmup_then_cosine() -> None:
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert lr_at(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0, 0.01) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_mixup_and_cutmix_targets_match_what_was_mixed() -> None:
    x = torch.zeros(4, 3, 2, 8, 8)
    x[1] = 1.0  # sample 1 is all ones, the others zeros; the batch is mixed with its reverse
    labels = torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, target = mix_batch(x, labels, 5, mixup, cutmix, 0.5, 0.0, random.Random(3))
        assert torch.allclose(target.sum(1), torch.ones(4))
        # sample 2 received sample 1's content: the share of ones is the share of label 1
        assert float(mixed[2].mean()) == pytest.approx(float(target[2, 1]), abs=1e-6)
        assert float(target[2, 2]) == pytest.approx(1 - float(target[2, 1]), abs=1e-6)
    _, smooth = mix_batch(x, labels, 5, 0.0, 0.0, 0.5, 0.1, random.Random(0))
    assert float(smooth[0, 0]) == pytest.approx(0.92) and float(smooth[0, 1]) == pytest.approx(0.02)
    loss = soft_cross_entropy(torch.zeros(4, 5), smooth)
    assert float(loss) == pytest.approx(np.log(5), rel=1e-6)


def test_random_window_stays_inside_the_clip() -> None:
    rng = random.Random(0)
    for length in (1, 5, 31, 32, 33, 300):
        idx = random_window(length, 8, 4, rng)
        assert len(idx) == 8 and all(0 <= i < length for i in idx) and idx == sorted(idx)
    idx = random_window(300, 8, 4, random.Random(1))
    assert np.diff(idx).tolist() == [4] * 7


def test_person_box_is_padded_square_and_inside_the_frame() -> None:
    w, h = COLOR_FRAME
    boxes = np.array([[900, 400, 1000, 700], [np.nan] * 4, [880, 420, 1010, 690]])
    box = person_box(boxes, pad=0.1)
    assert box is not None
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(300 * 1.2)  # union 130 x 300, padded
    assert x0 <= 880 and x1 >= 1010 and y0 <= 400 and y1 >= 700
    # near an edge the square slides inside the frame instead of leaving it
    edge = person_box(np.array([[1850, 10, 1915, 300]]), pad=0.2)
    assert edge is not None and edge[2] == pytest.approx(1.0) and edge[1] == 0.0
    assert person_box(np.full((3, 4), np.nan), 0.1) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "t", "data": {}}, "give either path"),
        ({"name": "t", "data": {"path": "/x", "train_list": "/a", "val_list": "/b"}}, "not both"),
        ({"name": "t", "data": {"path": "/x", "person_crop": True}}, "person_crop needs skeletons"),
        ({"name": "t", "data": {"path": "/x"}, "model": "resnet50"}, "unknown VideoMAE V2 model"),
        ({"name": "../up", "data": {"path": "/x"}}, "name"),
        ({"name": "t", "data": {"path": "/x"}, "epochs": True}, "epochs"),
        ({"name": "t", "data": {"path": "/x"}, "optimizer": {"layer_decay": 0}}, "layer_decay"),
        ({"name": "t", "data": {"path": "/x"}, "augment": {"scale": [0.9, 0.1]}}, "scale"),
        ({"name": "t", "data": {"path": "/x"}, "bogus": 1}, "bogus"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(raw: object, message: str) -> None:
    with pytest.raises(FinetuneConfigError, match=message):
        FinetuneConfig.from_dict(raw)


def test_config_file_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(FinetuneConfigError, match="empty"):
        FinetuneConfig.from_yaml(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(FinetuneConfigError, match="not valid YAML"):
        FinetuneConfig.from_yaml(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: t\ndata: {path: /x}\nbatch_size: 64\n")
    cfg = FinetuneConfig.from_yaml(ok)
    assert cfg.lr == pytest.approx(1e-3 * 64 / 256)  # the official blr scaling


def test_the_documented_example_config_is_valid_and_is_the_official_recipe() -> None:
    from tests.support.paths import PROJECT_ROOT

    cfg = FinetuneConfig.from_yaml(PROJECT_ROOT / "docs" / "finetune_example.yaml")
    defaults = FinetuneConfig.from_dict({"name": "x", "data": {"path": "/x"}})
    for part in ("optimizer", "augment"):
        assert getattr(cfg, part) == getattr(defaults, part)
    assert (cfg.num_frames, cfg.sampling_rate, cfg.size, cfg.drop_path) == (16, 4, 224, 0.1)
    assert (cfg.eval.temporal_views, cfg.eval.spatial_crops) == (5, 3)
