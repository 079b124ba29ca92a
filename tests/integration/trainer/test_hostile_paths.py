"""One list of hostile data paths, run through every entry point that takes one: the same verdict
everywhere (issue 8, items 2 and 3).

Entry points: the rule itself (``lastkd.datapaths``: the named path, then the data files of the
folder), the worker's and the API's config check (``confine_config_paths``), ``lastkd train``
(in process, through the real CLI), ``POST /train`` (the real app in process, through
``TestClient``) and the readers (``load_splits``). Every case names ``data.path``; the verdict is
``ok`` or the :class:`~lastkd.datapaths.DataPathError` kind (forbidden 403, missing/invalid 422).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from lastkd.datapaths import DataPathError, confine, confine_entries
from lastkd.services import cli
from lastkd.services.settings import Settings
from lastkd.services.trainer.api import create_app
from lastkd.student.config import TrainConfig
from lastkd.student.data.config import DataConfig
from lastkd.student.data.sources import load_splits
from lastkd.student.paths import confine_config_paths
from lastkd.student.synth import generate

pytestmark = pytest.mark.faults

TOKEN = "hostile-paths-token-0123"
# What a user reads for each verdict, whatever the entry point.
WORDS = {
    "forbidden": "outside the configured data roots",
    "missing": "does not exist",
    "invalid": r"NUL byte|bytes long",
}
STATUS = {"forbidden": 403, "missing": 422, "invalid": 422}


@dataclass(frozen=True)
class World:
    root: Path  # first data root (relative paths start here)
    home: Path  # $HOME: outside the roots, except home/data which is a second root
    outside: Path  # a valid skeleton folder outside every root
    roots: list[Path]
    link_file: Path  # the one .skeleton in root/mixed that links outside


# (case id, data.path as the user writes it, verdict)
CASES: list[tuple[str, str, str]] = [
    ("plain", "synth/skeletons", "ok"),
    ("tilde_inside_a_root", "~/data/skeletons", "ok"),
    ("dotdot", "../outside/skeletons", "forbidden"),
    ("dotdot_back_inside", "synth/../synth/skeletons", "ok"),
    ("absolute_outside", "{outside}", "forbidden"),
    ("tilde_outside", "~/skeletons", "forbidden"),
    ("symlink_dir_out", "linkdir", "forbidden"),
    ("symlink_file_out", "mixed", "forbidden"),
    ("nul_byte", "synth/ske\x00letons", "invalid"),
    ("long_component", "a" * 300, "invalid"),
    ("long_path", "/".join(["b" * 200] * 25), "invalid"),
    ("non_existent", "nope/skeletons", "missing"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("hostile")
    root = base / "datasets"
    generate(root / "synth", classes=2, samples_per_class=4, frames=40, video=False, seed=5)
    skeletons = root / "synth" / "skeletons"
    outside = base / "outside" / "skeletons"
    shutil.copytree(skeletons, outside)
    home = base / "home"
    home.mkdir()
    shutil.copytree(skeletons, home / "skeletons")  # ~/skeletons: outside the roots
    shutil.copytree(skeletons, home / "data" / "skeletons")  # ~/data is a root
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    mixed = root / "mixed"
    shutil.copytree(skeletons, mixed)
    victim = sorted(mixed.glob("*.skeleton"))[0]
    victim.unlink()
    victim.symlink_to(outside / victim.name)  # a data file inside a root that reads a file outside
    return World(root, home, outside, [root, home / "data"], victim)


@pytest.fixture(autouse=True)
def _home(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(world.home))


def _given(world: World, text: str) -> str:
    return text.format(outside=world.outside)


def _expect_words(verdict: str, message: str, world: World, case: str) -> None:
    assert re.search(WORDS[verdict], message), message
    assert "data.path" in message, message
    if case == "symlink_file_out":  # the refused file is named, not only the folder
        assert world.link_file.name in message, message


# --------------------------------------------------------------------------------------------
# the entry points; each returns "ok" or the kind, and checks the message it shows the user
def via_rule(world: World, given: str, case: str) -> str:
    try:
        real = confine(given, world.roots, field="data.path", must_exist=True)
        if real.is_dir():
            confine_entries(real, world.roots, field="data.path")
    except DataPathError as exc:
        _expect_words(exc.kind, str(exc), world, case)
        return exc.kind
    return "ok"


def _config(given: str, name: str = "hostile") -> dict:
    return {
        "name": name,
        "epochs": 1,
        "batch_size": 2,
        "max_steps_per_epoch": 1,
        "device": "cpu",
        "data": {"path": given, "num_frames": 8, "max_samples": 2},
        "eval": {"jitter_stds": [], "joint_drop_probs": [], "frame_drop_probs": []},
    }


def via_config_check(world: World, given: str, case: str) -> str:
    """The check the API runs at submit time and the worker again before training."""
    try:
        confined = confine_config_paths(TrainConfig.from_dict(_config(given)), world.roots)
    except DataPathError as exc:
        _expect_words(exc.kind, str(exc), world, case)
        return exc.kind
    assert confined.data.path.is_absolute()
    return "ok"


def via_readers(world: World, given: str, case: str) -> str:
    try:
        train, val = load_splits(DataConfig(path=Path(given), cache_dir=None), world.roots)
    except DataPathError as exc:
        _expect_words(exc.kind, str(exc), world, case)
        return exc.kind
    assert len(train) and len(val)
    return "ok"


def via_cli(
    world: World,
    given: str,
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    monkeypatch.setenv("LASTKD_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LASTKD_DATA_ROOTS", json.dumps([str(r) for r in world.roots]))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(_config(given)), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-sample step: more threads only contend (30 s instead of 2 s on 2 cores)
    try:
        rc = cli.main(["train", str(cfg), "--no-publish", "--run-dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    if rc == 0:
        return "ok"
    assert rc == 2, err
    kind = next(k for k, words in WORDS.items() if re.search(words, err))
    _expect_words(kind, err, world, case)
    return kind


@pytest.fixture(scope="module")
def api(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("api-var"),
        data_roots=world.roots,
        api_token=TOKEN,  # type: ignore[arg-type]
    )
    with TestClient(create_app(settings, sweep_interval_s=3600)) as client:
        yield client


def via_api(client: TestClient, world: World, given: str, case: str) -> str:
    name = f"h-{case.replace('_', '-')}"
    resp = client.post("/train", json=_config(given, name), headers={"Authorization": f"Bearer {TOKEN}"})
    if resp.status_code == 202:
        return "ok"
    error = resp.json()["error"]
    kind = error["code"].removeprefix("path_")
    assert resp.status_code == STATUS[kind], resp.text
    assert error["field"] == "data.path"
    _expect_words(kind, error["message"], world, case)
    return kind


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, given, verdict", CASES, ids=[c[0] for c in CASES])
def test_same_verdict_at_every_entry_point(
    case: str,
    given: str,
    verdict: str,
    world: World,
    api: TestClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    given = _given(world, given)
    entry_points: dict[str, Callable[[], str]] = {
        "datapaths.confine": lambda: via_rule(world, given, case),
        "config check (API submit, worker)": lambda: via_config_check(world, given, case),
        "readers (load_splits)": lambda: via_readers(world, given, case),
        "POST /train": lambda: via_api(api, world, given, case),
        "lastkd train": lambda: via_cli(world, given, case, tmp_path, monkeypatch, capsys),
    }
    verdicts = {where: run() for where, run in entry_points.items()}
    assert verdicts == dict.fromkeys(entry_points, verdict)


def test_symlinked_skeleton_is_refused_even_when_the_folder_was_cached(world: World, tmp_path: Path) -> None:
    """A link planted after the parse cache was built is refused on the next load, not read."""
    folder = world.root / "late"
    shutil.copytree(world.root / "synth" / "skeletons", folder, ignore=shutil.ignore_patterns(".lastkd_cache"))
    load_splits(DataConfig(path=folder), world.roots)  # builds the cache
    extra = folder / "S001C001P001R001A002.skeleton"
    extra.symlink_to(world.outside / sorted(p.name for p in world.outside.glob("*.skeleton"))[0])
    try:
        with pytest.raises(DataPathError, match=extra.name) as info:
            load_splits(DataConfig(path=folder), world.roots)
        assert info.value.kind == "forbidden"
    finally:
        shutil.rmtree(folder)


def test_parse_cache_that_links_out_is_refused(world: World) -> None:
    folder = world.root / "cachelink"
    shutil.copytree(world.root / "synth" / "skeletons", folder, ignore=shutil.ignore_patterns(".lastkd_cache"))
    hidden = world.home / "elsewhere-cache"
    hidden.mkdir()
    (folder / ".lastkd_cache").symlink_to(hidden, target_is_directory=True)
    try:
        with pytest.raises(DataPathError, match="data.cache_dir") as info:
            load_splits(DataConfig(path=folder), world.roots)
        assert info.value.kind == "forbidden"
        assert not any(hidden.iterdir())  # nothing was written out there either
        with pytest.raises(DataPathError, match="data.cache_dir"):
            confine_config_paths(TrainConfig.from_dict(_config(str(folder))), world.roots)
    finally:
        shutil.rmtree(folder)
        shutil.rmtree(hidden)


@pytest.mark.parametrize(
    "fmt, given, link, extra",
    [
        ("last_npy", "last", "last/xsub/train_joint.npy", {}),
        ("last_npy", "last2", "labels/train_label.pkl", {"label_path": "labels"}),
        ("pyskl", "ann.pkl", "ann.pkl", {}),
        ("ctrgcn_npz", "d.npz", "d.npz", {}),
    ],
    ids=["last-stream-npy", "last-label-pickle", "pyskl-pickle", "ctrgcn-npz"],
)
def test_data_files_of_every_format_are_confined(
    world: World, tmp_path: Path, fmt: str, given: str, link: str, extra: dict
) -> None:
    """Arrays and pickles that are symlinks out of the roots are refused, the file named, before
    anything is read: by the config check (API, worker, CLI) and by the readers."""
    secret = world.home / f"secret-{tmp_path.name}{Path(link).suffix}"
    secret.write_bytes(b"not for the job")
    made = []
    for folder in ("last/xsub", "last2", "labels"):
        (world.root / folder).mkdir(parents=True, exist_ok=True)
        made.append(world.root / folder.split("/")[0])
    target = world.root / link
    target.symlink_to(secret)
    try:
        raw = _config(given)
        raw["data"].update(format=fmt, **extra)
        with pytest.raises(DataPathError, match=re.escape(target.name)) as info:
            confine_config_paths(TrainConfig.from_dict(raw), world.roots)
        assert info.value.kind == "forbidden"
        if fmt != "last_npy" or "label_path" not in extra:  # (the label pickle is read after valid arrays)
            cfg = DataConfig(path=Path(given), format=fmt, **extra)  # type: ignore[arg-type]
            with pytest.raises(DataPathError, match=re.escape(target.name)) as info:
                load_splits(cfg, world.roots)
            assert info.value.kind == "forbidden"
    finally:
        target.unlink()
        secret.unlink()
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def test_engine_confines_the_label_map_it_reads(world: World, tmp_path: Path) -> None:
    """The engine itself (any caller, not only the config check) refuses a label map outside."""
    from lastkd.student import training as engine

    secret = world.home / "label_map.txt"
    secret.write_text("\n".join(f"class {i}" for i in range(60)))
    config = TrainConfig.from_dict(
        _config(str(world.root / "synth" / "skeletons")) | {"eval": {"label_map": str(secret)}}
    )
    try:
        with pytest.raises(DataPathError, match="eval.label_map") as info:
            engine.train(config, tmp_path / "run", data_roots=world.roots)
        assert info.value.kind == "forbidden"
    finally:
        secret.unlink()
