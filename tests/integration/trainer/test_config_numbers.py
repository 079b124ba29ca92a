"""Numbers in job configs are numbers (issue 8, item 9): integer fields take integers strictly,
float fields refuse booleans and text, and NaN/infinity is "not a finite number", the same through
a YAML file (``lastkd train``) and ``POST /train``; and the rule covers every numeric field of the
config tree, found by walking the models (so a field added later cannot miss it)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lastkd.services.settings import Settings
from lastkd.services.trainer.api import create_app
from lastkd.student.config import ConfigError, TrainConfig

pytestmark = pytest.mark.faults

TOKEN = "numbers-token-0123456789"
BASE: dict[str, Any] = {"name": "numbers", "epochs": 2, "data": {"path": "synth/skeletons"}}


def _with(dotted: str, value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return raw


# (field, value, words the user reads)
CASES = [
    ("epochs", True, "must be an integer, not a boolean"),
    ("epochs", "2", "must be an integer, not text"),
    ("epochs", 2.0, "must be an integer, not a float"),
    ("batch_size", False, "must be an integer, not a boolean"),
    ("data.num_frames", "64", "must be an integer, not text"),
    ("data.max_samples", True, "must be an integer, not a boolean"),
    ("distill.projector_hidden", "512", "must be an integer, not text"),
    ("schedule.milestones", [1, True], "item 1 (True) must be an integer, not a boolean"),
    ("optimizer.lr", True, "must be a number, not a boolean"),
    ("optimizer.lr", "0.1", "must be a number, not text"),
    ("distill.alpha_start", True, "must be a number, not a boolean"),
    ("optimizer.lr", math.nan, "must be a finite number"),
    ("optimizer.lr", math.inf, "must be a finite number"),
    ("grad_clip", -math.inf, "must be a finite number"),
    ("label_smoothing", math.nan, "must be a finite number"),
    ("data.augment.noise_std", math.nan, "must be a finite number"),
    ("eval.jitter_stds", [0.1, math.nan], "must be a finite number"),
    ("distill.alpha_end", math.nan, "must be a finite number"),
]
IDS = [f"{field}={value!r}" for field, value, _ in CASES]


@pytest.mark.parametrize("field, value, words", CASES, ids=IDS)
def test_yaml_config_refuses(tmp_path: Path, field: str, value: Any, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(field, value)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_yaml(path)
    line = next(ln for ln in str(info.value).splitlines() if ln.strip().startswith(field))
    assert words in line, str(info.value)
    assert "less than" not in line and "greater than" not in line  # the range is not the problem


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    base = tmp_path_factory.mktemp("numbers-api")
    (base / "datasets").mkdir()
    settings = Settings(data_dir=base / "var", data_roots=[base / "datasets"], api_token=TOKEN)  # type: ignore[arg-type]
    with TestClient(create_app(settings, sweep_interval_s=3600)) as client:
        yield client


@pytest.mark.parametrize("field, value, words", CASES, ids=IDS)
def test_post_train_refuses(api: TestClient, field: str, value: Any, words: str) -> None:
    body = json.dumps(_with(field, value))  # NaN/Infinity as Python's json writes them (and reads them)
    resp = api.post(
        "/train", content=body, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    )
    assert resp.status_code == 422, resp.text
    details = resp.json()["error"]["details"]
    hit = [d for d in details if d["field"].startswith(field)]
    assert hit and words in hit[0]["msg"], details


def test_plain_numbers_still_accepted() -> None:
    config = TrainConfig.from_dict(
        _with("optimizer", {"lr": 1, "momentum": 0.5}) | {"grad_clip": 5, "schedule": {"milestones": [1, 2]}}
    )
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.grad_clip == 5.0 and config.schedule.milestones == (1, 2)


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field, 'int' or 'float') for every numeric field of the config tree."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = [a for a in get_args(ann) if a is not type(None)] if get_origin(ann) is not None else [ann]
        if get_origin(ann) is tuple:
            continue  # tuples are covered by the explicit cases above
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _numeric_fields(arg, f"{prefix}{name}.")
            elif arg is int or arg is float:
                yield f"{prefix}{name}", arg.__name__


def test_every_numeric_field_refuses_booleans_and_nan() -> None:
    fields = list(_numeric_fields(TrainConfig))
    assert len(fields) > 20  # the walk found the tree
    for field, kind in fields:
        with pytest.raises(ConfigError, match="not a boolean"):
            TrainConfig.from_dict(_with(field, True))
        if kind == "int":
            with pytest.raises(ConfigError, match="not text"):
                TrainConfig.from_dict(_with(field, "3"))
        else:
            with pytest.raises(ConfigError, match="must be a finite number"):
                TrainConfig.from_dict(_with(field, math.nan))
