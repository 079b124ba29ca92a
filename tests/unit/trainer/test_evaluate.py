"""Evaluation: metrics against hand-computed values, the object-class list against the NTU label
map, and the skeleton corruptions against stream definitions computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lastkd.models.last_v2 import LASTv2
from lastkd.student import evaluate as ev
from lastkd.student.data import streams as st
from tests.support.paths import SHARED

LABEL_MAP = SHARED / "data" / "ntu60_label_map.txt"

# The object-interaction classes as named in the task statement (matched as substrings).
OBJECT_NAMES = [
    "drink water",
    "eat meal/snack",
    "brushing teeth",
    "brushing hair",
    "drop",
    "pickup",
    "throw",
    "reading",
    "writing",
    "tear up paper",
    "wear jacket",
    "take off jacket",
    "wear a shoe",
    "take off a shoe",
    "wear on glasses",
    "take off glasses",
    "put on a hat/cap",
    "take off a hat/cap",
    "make a phone call",
    "playing with phone/tablet",
    "typing on a keyboard",
    "selfie",
]


def test_object_classes_match_label_map() -> None:
    names = [line.strip() for line in LABEL_MAP.read_text().splitlines() if line.strip()]
    assert len(names) == 60
    found = []
    for key in OBJECT_NAMES:
        hits = [i for i, n in enumerate(names) if key in n]
        assert len(hits) == 1, (key, hits)
        found.append(hits[0])
    assert sorted(found) == list(ev.OBJECT_CLASSES_NTU60)
    assert ev.class_names(60, LABEL_MAP)[27] == "make a phone call/answer phone"
    assert ev.object_classes(120) == ev.OBJECT_CLASSES_NTU60
    assert ev.object_classes(10) == ()


def test_label_map_errors(tmp_path) -> None:
    with pytest.raises(ev.EvaluationError, match="not found"):
        ev.class_names(60, tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ev.EvaluationError, match="empty"):
        ev.class_names(60, empty)
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ev.EvaluationError, match="2 names, the model has 60"):
        ev.class_names(60, short)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ev.EvaluationError, match="UTF-8"):
        ev.class_names(60, binary)
    assert ev.class_names(3) == ["A001", "A002", "A003"]


def test_metrics_against_hand_computed_values() -> None:
    # 6 classes, 5 samples. Rows are scores; labels chosen so that:
    #  s0 label 0, argmax 0 (correct)            s1 label 1, argmax 2, label 2nd
    #  s2 label 2, argmax 2 (correct)            s3 label 3, label ranked 6th (outside top-5)
    #  s4 label 0, argmax 4, label 3rd
    scores = np.array(
        [
            [9, 1, 2, 3, 4, 5],
            [0, 8, 9, 1, 2, 3],
            [1, 2, 9, 3, 4, 5],
            [5, 4, 3, 0, 2, 1],
            [7, 1, 2, 3, 9, 8],
        ],
        dtype=np.float64,
    )
    logprob = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    labels = np.array([0, 1, 2, 3, 0])
    m = ev.compute_metrics(logprob, labels, objects=[0, 1])
    assert m["num_samples"] == 5
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top5"] == pytest.approx(4 / 5)
    assert m["nll"] == pytest.approx(-np.mean(logprob[np.arange(5), labels]))
    acc = {p["index"]: p["accuracy"] for p in m["per_class"]}
    assert acc == {0: 0.5, 1: 0.0, 2: 1.0, 3: 0.0, 4: None, 5: None}
    assert m["mean_class_accuracy"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    cm = np.zeros((6, 6), int)
    for t, p in [(0, 0), (1, 2), (2, 2), (3, 0), (0, 4)]:
        cm[t, p] += 1
    assert np.array_equal(np.array(m["confusion"]), cm)
    # objects = classes 0, 1 -> samples 0, 1, 4 of which 1 correct; others: 2, 3 -> 1 correct
    assert m["object_classes"] == {"classes": [0, 1], "count": 3, "top1": pytest.approx(1 / 3)}
    assert m["non_object_classes"] == {"count": 2, "top1": pytest.approx(1 / 2)}


def test_metrics_reject_bad_predictions() -> None:
    with pytest.raises(ev.EvaluationError, match="do not match"):
        ev.compute_metrics(np.zeros((3, 4)), np.zeros(2, int))
    with pytest.raises(ev.EvaluationError, match="outside"):
        ev.compute_metrics(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(ev.EvaluationError, match="NaN"):
        ev.compute_metrics(np.full((2, 4), np.nan), np.array([0, 1]))
    with pytest.raises(ev.EvaluationError, match="class names"):
        ev.compute_metrics(np.zeros((2, 4)), np.array([0, 1]), names=["a"])


# --------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------
def _batch(b: int = 6, t: int = 12, absent_second_body: bool = True, parents=st.REFERENCE_BONE_PARENTS):
    """Streams computed independently with the data module's numpy definitions (reference velocity)."""
    rng = np.random.default_rng(0)
    joints = rng.normal(size=(b, 3, t, 25, 2)).astype(np.float32)
    if absent_second_body:
        joints[:, :, :, :, 1] = 0
    vel = np.stack([st.reference_velocity(j) for j in joints])
    bone = np.stack([st.bone_stream(j, parents) for j in joints])
    return {"joint": torch.from_numpy(joints), "velocity": torch.from_numpy(vel), "bone": torch.from_numpy(bone)}


def _recomputed(joint: torch.Tensor, parents) -> tuple[np.ndarray, np.ndarray]:
    j = joint.numpy()
    return np.stack([st.reference_velocity(x) for x in j]), np.stack([st.bone_stream(x, parents) for x in j])


@pytest.mark.parametrize("parents", [st.REFERENCE_BONE_PARENTS, st.NTU_BONE_PARENTS])
def test_jitter_is_consistent_across_streams(parents) -> None:
    x = _batch(parents=parents)
    out = ev.corrupt_streams(x, list(range(6)), ev.Corruption("jitter", 0.05), seed=3, bone_parents=parents)
    delta = (out["joint"] - x["joint"])[..., 0]
    assert 0.045 < float(delta.std()) < 0.055
    assert torch.equal(out["joint"][..., 1], torch.zeros_like(out["joint"][..., 1]))  # absent body stays absent
    vel, bone = _recomputed(out["joint"], parents)
    np.testing.assert_allclose(out["bone"].numpy(), bone, atol=1e-5)
    np.testing.assert_allclose(out["velocity"][:, :, :-1].numpy(), vel[:, :, :-1], atol=1e-5)
    assert torch.equal(out["velocity"][:, :, -1], x["velocity"][:, :, -1])
    assert torch.equal(x["joint"], _batch(parents=parents)["joint"])  # input untouched


def test_joint_drop_recomputes_streams() -> None:
    x = _batch(b=40)
    out = ev.corrupt_streams(x, list(range(40)), ev.Corruption("joint_drop", 0.3), seed=1)
    dropped = out["joint"][..., 0].abs().amax(dim=(1, 2)) == 0  # (B, V)
    assert 0.2 < float(dropped.float().mean()) < 0.4
    vel, bone = _recomputed(out["joint"], st.REFERENCE_BONE_PARENTS)
    np.testing.assert_allclose(out["bone"].numpy(), bone, atol=1e-6)
    np.testing.assert_allclose(out["velocity"].numpy()[:, :, :-1], vel[:, :, :-1], atol=1e-6)
    v_dropped = out["velocity"][..., 0].abs().amax(dim=(1, 2)) == 0
    assert torch.equal(v_dropped, dropped)


def test_frame_drop_holds_last_frame() -> None:
    x = _batch(b=8, t=30)
    out = ev.corrupt_streams(x, list(range(8)), ev.Corruption("frame_drop", 0.4), seed=2)
    j, j0 = out["joint"][..., 0], x["joint"][..., 0]
    held_total = 0
    for b in range(8):
        assert torch.equal(j[b, :, 0], j0[b, :, 0])
        for t in range(1, 30):
            same_as_prev = torch.equal(j[b, :, t], j[b, :, t - 1])
            is_original = torch.equal(j[b, :, t], j0[b, :, t])
            assert same_as_prev or is_original
            if not is_original:
                held_total += 1
                assert float(out["velocity"][b, :, t].abs().max()) == 0.0
                assert torch.equal(out["bone"][b, :, t], out["bone"][b, :, t - 1])
    assert 0.25 * 8 * 29 < held_total < 0.55 * 8 * 29


def test_corruption_is_per_sample_deterministic() -> None:
    x = _batch(b=6)
    corr = ev.Corruption("jitter", 0.1)
    full = ev.corrupt_streams(x, [10, 11, 12, 13, 14, 15], corr, seed=5)
    part = ev.corrupt_streams({k: v[3:] for k, v in x.items()}, [13, 14, 15], corr, seed=5)
    assert torch.equal(full["joint"][3:], part["joint"])
    other = ev.corrupt_streams(x, [10, 11, 12, 13, 14, 15], corr, seed=6)
    assert not torch.equal(full["joint"], other["joint"])


def test_corruption_without_joint_stream_applies_same_pattern() -> None:
    x = _batch(b=4)
    only = {"velocity": x["velocity"], "bone": x["bone"]}
    out = ev.corrupt_streams(only, [0, 1, 2, 3], ev.Corruption("joint_drop", 0.5), seed=0)
    dv = out["velocity"][..., 0].abs().amax(dim=(1, 2)) == 0
    db = out["bone"][..., 0].abs().amax(dim=(1, 2)) == 0
    # joint 0 has a zero bone anyway (its own parent); elsewhere both streams miss the same joints
    assert torch.equal(dv[:, 1:], db[:, 1:]) and dv.any() and not dv.all()


def test_corruption_rejects_bad_input() -> None:
    with pytest.raises(ev.EvaluationError, match="unknown corruption"):
        ev.Corruption("blur", 0.1)
    with pytest.raises(ev.EvaluationError, match="out of range"):
        ev.Corruption("frame_drop", 1.0)
    x = _batch(b=2)
    with pytest.raises(ev.EvaluationError, match="2 sample indices for a batch of|1 sample indices"):
        ev.corrupt_streams(x, [0], ev.Corruption("jitter", 0.1), seed=0)
    with pytest.raises(ev.EvaluationError, match=r"\(B, 3, T, 25, M\)"):
        ev.corrupt_streams({"joint": torch.zeros(2, 3, 4, 24, 2)}, [0, 1], ev.Corruption("jitter", 0.1), seed=0)


def test_evaluate_model_matches_direct_forward() -> None:
    torch.manual_seed(0)
    model = LASTv2(num_classes=60, variant="small").train()
    x = _batch(b=5, t=8)
    labels = torch.tensor([0, 5, 27, 40, 59])
    loader = [
        {**{k: v[:3] for k, v in x.items()}, "label": labels[:3], "index": torch.arange(3)},
        {**{k: v[3:] for k, v in x.items()}, "label": labels[3:], "index": torch.arange(3, 5)},
    ]
    corrs = ev.corruptions_from([0.0, 0.1], [0.2], [0.3])
    assert [c.key for c in corrs] == ["jitter@0.1", "joint_drop@0.2", "frame_drop@0.3"]
    metrics = ev.evaluate_model(
        model,
        loader,
        torch.device("cpu"),
        ("joint", "velocity", "bone"),
        names=ev.class_names(60, LABEL_MAP),
        corruptions=corrs,
        noise_seed=0,
    )
    assert model.training  # mode restored
    with torch.no_grad():
        direct = model.eval()(x).numpy()
    assert metrics["top1"] == pytest.approx(float((direct.argmax(1) == labels.numpy()).mean()))
    assert metrics["nll"] == pytest.approx(float(-direct[np.arange(5), labels.numpy()].mean()), rel=1e-5)
    assert set(metrics["robustness"]) == {"jitter@0.1", "joint_drop@0.2", "frame_drop@0.3"}
    assert metrics["object_classes"]["count"] == 3  # drink water (0), pickup (5), phone call (27)
    assert metrics["per_class"][27]["name"] == "make a phone call/answer phone"
