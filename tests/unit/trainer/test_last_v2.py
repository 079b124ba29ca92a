"""LAST v2 student against the reference fixtures (state-dict layout, golden outputs, spec facts)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from lastkd.models.last_v2 import (
    VARIANTS,
    LASTv2,
    build_ntu_spatial_adjacency,
    create_last_v2,
    num_parameters,
)
from tests.support.paths import REFERENCE

SHAPES_JSON = REFERENCE / "last_v2_state_dict_shapes.json"
GOLDEN = REFERENCE / "last_v2_small_golden.pt"
STREAMS = ("joint", "velocity", "bone")
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The CPUs are shared; one intra-op thread avoids OpenMP stalls when they are oversubscribed.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shapes() -> dict:
    return json.loads(SHAPES_JSON.read_text())["variants"]


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope="module")
def golden_model(golden: dict) -> LASTv2:
    model = LASTv2(num_classes=60, variant="small")
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- state-dict layout


@pytest.mark.parametrize("variant", ["small", "base", "large"])
@pytest.mark.parametrize("num_classes", [60, 120])
def test_state_dict_matches_reference_layout(shapes: dict, variant: str, num_classes: int) -> None:
    ref = shapes[variant][str(num_classes)]
    model = create_last_v2(variant, num_classes)
    sd = model.state_dict()
    assert list(sd) == list(ref["state_dict"])  # same keys, same order
    for key, tensor in sd.items():
        entry = ref["state_dict"][key]
        assert list(tensor.shape) == entry["shape"], key
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"], key
    params = dict(model.named_parameters())
    kinds = {k: ("parameter" if k in params else "buffer") for k in sd}
    assert kinds == {k: v["kind"] for k, v in ref["state_dict"].items()}
    assert num_parameters(model) == ref["num_params"]
    assert len(sd) == ref["num_state_dict_keys"]
    assert len(params) == ref["num_parameter_tensors"]
    assert len(model.backbone) == ref["num_blocks"]
    assert model.feature_dim == VARIANTS[variant].channels[-1]


def test_adjacency_buffers_share_storage_with_model_buffer() -> None:
    model = LASTv2(variant="small")
    for block in model.backbone:
        assert block.gcn.A_physical.data_ptr() == model.A.data_ptr()


# ---------------------------------------------------------------- golden outputs


def test_strict_load_of_golden_state_dict(golden: dict) -> None:
    model = LASTv2(num_classes=60, variant="small")
    result = model.load_state_dict(golden["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, golden["state_dict"][key]), key


def _check_case(model: LASTv2, inputs: dict, case: dict) -> dict[str, float]:
    with torch.no_grad():
        logprob = model(inputs)
        logits_joint = model(inputs["joint"])
        per_stream = model.forward_stream_features(inputs)
    errs = {"logprob": _max_err(logprob, case["logprob"]), "logits_joint": _max_err(logits_joint, case["logits_joint"])}
    torch.testing.assert_close(logprob, case["logprob"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits_joint, case["logits_joint"], atol=ATOL, rtol=RTOL)
    for name, feat in zip(STREAMS, per_stream):
        assert feat.shape == (2, 2, 256)
        torch.testing.assert_close(feat, case["features"][name], atol=ATOL, rtol=RTOL)
        errs[f"features.{name}"] = _max_err(feat, case["features"][name])
    return errs


def test_golden_base_case(golden: dict, golden_model: LASTv2) -> None:
    errs = _check_case(golden_model, golden["input"], golden)
    print("golden base max abs errors:", errs)


def test_golden_perturbed_case(golden: dict) -> None:
    weights = dict(golden["state_dict"])
    weights.update(golden["perturbed"]["overrides"])
    model = LASTv2(num_classes=60, variant="small")
    model.load_state_dict(weights, strict=True)
    errs = _check_case(model.eval(), golden["input"], golden["perturbed"])
    print("golden perturbed max abs errors:", errs)


def test_train_mode_running_statistics_match_reference(golden: dict) -> None:
    """Seed 0 + the three documented train-mode passes reproduce the golden state_dict.

    This exercises train-mode semantics: per-stream backbone batches, per-stream input BN, and
    dropout drawing the RNG in the reference order (stream by stream, head included).
    """
    info = golden["train_stat_inputs"]
    torch.manual_seed(0)
    model = LASTv2(num_classes=60, variant="small").train()
    with torch.no_grad():
        for seed in info["seeds"]:
            torch.manual_seed(seed)
            batch = {}
            for name in info["stream_order"]:
                scale, shift = info["scale_shift"][name]
                batch[name] = torch.randn(*info["shape"]) * scale + shift
            model(batch)
    sd = model.state_dict()
    for key, ref in golden["state_dict"].items():
        if ref.dtype == torch.int64:
            assert torch.equal(sd[key], ref), key
        else:
            torch.testing.assert_close(sd[key], ref, atol=ATOL, rtol=RTOL, msg=key)
    assert sd["data_bn.1.num_batches_tracked"].item() == 3
    assert sd["backbone.9.tcn.proj.weight"].shape == (256, 256)
    assert sd["backbone.0.gcn_bn.num_batches_tracked"].item() == 9


def test_seed0_initialisation_is_bit_identical(golden: dict) -> None:
    torch.manual_seed(0)
    model = LASTv2(num_classes=60, variant="small")
    params = dict(model.named_parameters())
    assert len(params) == 248
    for key, value in params.items():
        assert torch.equal(value.detach(), golden["state_dict"][key]), key


# ---------------------------------------------------------------- features API


def test_forward_with_features_equals_separate_calls(golden: dict, golden_model: LASTv2) -> None:
    inputs = golden["input"]
    with torch.no_grad():
        out, feat = golden_model.forward_with_features(inputs)
        torch.testing.assert_close(out, golden_model(inputs), atol=0, rtol=0)
        torch.testing.assert_close(feat, golden_model.forward_features(inputs), atol=0, rtol=0)
    assert feat.shape == (2, golden_model.feature_dim)
    # Independent of our per-stream path: mean of the golden per-stream features over streams and bodies.
    expected = torch.stack([golden["features"][s] for s in STREAMS]).mean(dim=(0, 2))
    torch.testing.assert_close(feat, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, golden["logprob"], atol=ATOL, rtol=RTOL)


def test_forward_with_features_in_train_mode_matches_forward_with_same_rng() -> None:
    torch.manual_seed(3)
    model = LASTv2(num_classes=5, variant="small").train()
    x = {s: torch.randn(2, 3, 8, 25, 2) for s in STREAMS}
    # Train-mode outputs use batch statistics and dropout, so equal RNG state gives equal results.
    torch.manual_seed(11)
    out, feat = model.forward_with_features(x)
    torch.manual_seed(11)
    out2 = model(x)
    torch.manual_seed(11)
    feat2 = model.forward_features(x)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(feat, feat2, atol=0, rtol=0)
    assert (feat >= 0).all()  # pooled after the final ReLU


def test_tensor_input_features_and_unknown_key_uses_joint_bn(golden: dict, golden_model: LASTv2) -> None:
    joint = golden["input"]["joint"]
    with torch.no_grad():
        logits = golden_model(joint)
        unknown = golden_model({"skeleton": joint})
        feat = golden_model.forward_features(joint)
        as_velocity = golden_model({"velocity": joint})
    torch.testing.assert_close(unknown, torch.log(torch.softmax(logits, -1) + 1e-8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feat, golden["features"]["joint"].mean(dim=1), atol=ATOL, rtol=RTOL)
    assert _max_err(as_velocity, unknown) > 1e-4  # the velocity BN really is a different one


# ---------------------------------------------------------------- spec facts


def test_graph_matches_spec_and_golden(golden: dict) -> None:
    a = build_ntu_spatial_adjacency()
    assert a.dtype == torch.float32 and a.shape == (3, 25, 25)
    assert torch.equal(a, golden["state_dict"]["A"])
    assert [int((a[k] != 0).sum()) for k in range(3)] == [25, 40, 8]
    deg = [4, 3, 3, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 3, 3, 3, 2, 5, 2, 3, 2, 3]
    diag = torch.tensor([float(Fraction(1, d)) for d in deg], dtype=torch.float32)
    assert torch.equal(torch.diagonal(a[0]), diag)
    spot = {
        (1, 0, 1): Fraction(1, 3),
        (1, 1, 20): Fraction(1, 5),
        (1, 14, 15): Fraction(1, 2),
        (1, 12, 0): Fraction(1, 4),
        (1, 24, 23): Fraction(1, 2),
        (2, 1, 0): Fraction(1, 4),
        (2, 2, 3): Fraction(1, 2),
        (2, 20, 8): Fraction(1, 3),
    }
    for (k, j, i), value in spot.items():
        assert a[k, j, i].item() == torch.tensor(float(value), dtype=torch.float32).item(), (k, j, i)
    assert torch.nonzero(a[2]).tolist() == [[1, 0], [2, 3], [4, 5], [8, 9], [20, 1], [20, 2], [20, 4], [20, 8]]
    assert a[1, 20, 1] == 0 and a[1, 1, 0] == 0  # centre-ward edges land in A[2], not A[1]


@pytest.mark.parametrize(("t_in", "t_out"), [(64, 16), (9, 3), (6, 2)])
def test_temporal_length_after_stride2_blocks(t_in: int, t_out: int) -> None:
    model = LASTv2(num_classes=7, variant="small").eval()
    lengths = []
    h = torch.randn(2, 3, t_in, 25)
    with torch.no_grad():
        for block in model.backbone:
            h = block(h)
            lengths.append(h.shape[2])
    assert h.shape == (2, 256, t_out, 25)
    mid = (t_in - 1) // 2 + 1
    assert lengths == [t_in] * 3 + [mid] * 3 + [(mid - 1) // 2 + 1] * 4


def test_learned_adjacency_gets_no_gradient_but_alpha_does() -> None:
    torch.manual_seed(0)
    model = LASTv2(num_classes=4, variant="small").train()
    out = model({s: torch.randn(2, 3, 8, 25, 2) for s in STREAMS})
    torch.nn.functional.nll_loss(out, torch.tensor([1, 3])).backward()
    for block in model.backbone:
        assert torch.count_nonzero(block.gcn.A_learned.grad) == 0
        assert torch.count_nonzero(block.gcn.subset_convs[3].weight.grad) == 0
        assert torch.count_nonzero(block.gcn.subset_convs[4].weight.grad) > 0
    assert sum(int(torch.count_nonzero(b.st_att.alpha.grad)) for b in model.backbone) > 0


def test_dict_output_is_log_mean_softmax(golden_model: LASTv2) -> None:
    torch.manual_seed(5)
    x = {s: torch.randn(1, 3, 12, 25, 2) for s in ("bone", "joint")}
    with torch.no_grad():
        out = golden_model(x)
        logits = [golden_model({name: t}) for name, t in x.items()]  # each log(softmax + 1e-8)
    probs = [torch.exp(lp) - 1e-8 for lp in logits]
    torch.testing.assert_close(out, torch.log((probs[0] + probs[1]) / 2 + 1e-8), atol=1e-5, rtol=1e-4)
    assert abs(torch.exp(out).sum().item() - 1.0) < 1e-5


# ---------------------------------------------------------------- bad input


def test_bad_variant_and_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown LAST v2 variant 'tiny'"):
        LASTv2(variant="tiny")
    with pytest.raises(ValueError, match="unknown LAST v2 variant"):
        create_last_v2("SMALL")
    with pytest.raises(ValueError, match="num_classes"):
        LASTv2(num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        LASTv2(num_classes=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        LASTv2(in_channels=-3)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.randn(2, 3, 8, 24, 2), ValueError, r"V=25"),
        (torch.randn(2, 2, 8, 25, 2), ValueError, r"C=3"),
        (torch.randn(3, 8, 25), ValueError, r"expected shape"),
        (torch.zeros(1, 3, 8, 25, 2, dtype=torch.int64), ValueError, r"floating-point"),
        (torch.randn(0, 3, 8, 25, 2), ValueError, r"N>=1"),
        ({}, ValueError, r"dict is empty"),
        ({"joint": torch.randn(1, 3, 8, 25, 2), "bone": torch.randn(1, 3, 9, 25, 2)}, ValueError, r"other streams"),
        ({"joint": [[1.0]]}, TypeError, r"expected a torch.Tensor"),
        ([torch.randn(1, 3, 8, 25, 2)], TypeError, r"mapping of stream tensors"),
    ],
)
def test_malformed_input_is_rejected(golden_model: LASTv2, bad: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        golden_model(bad)  # type: ignore[arg-type]
