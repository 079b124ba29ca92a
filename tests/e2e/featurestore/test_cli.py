"""`lastkd store stats|ls|export|verify`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lastkd.featurestore import FeatureStore
from tests.support.paths import PROJECT_ROOT

CONSOLE_SCRIPT = Path(sys.executable).parent / "lastkd"


def lastkd(*args: object, env: dict[str, str] | None = None, script: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "lastkd.services.cli"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    full_env.update(env or {})
    return subprocess.run(
        [*command, "store", *map(str, args)],
        cwd=PROJECT_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def filled_store(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "data" / "features.lmdb"
    with FeatureStore(path, map_size=64 << 20) as store:
        a = store.create_set("videomae_v2_vit_b", None, {"crop": 224}, dim=768, dtype="float16").set_id
        b = store.create_set("videomae_v2_vit_b", "c0" * 32, {"crop": 224}, dim=8, dtype="float32").set_id
        store.put_many(a, [f"S001C001P001R001A{i:03d}" for i in range(1, 31)], np.ones((30, 768), np.float32))
        store.put_many(b, ["x", "y"], np.zeros((2, 8), np.float32))
    return path, a, b


def test_stats_json_and_text(filled_store) -> None:
    path, _, _ = filled_store
    result = lastkd("stats", "--path", path, "--json", script=True)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["sets"] == 2 and stats["vectors"] == 32 and stats["path"] == str(path)
    assert stats["file_bytes"] == (path / "data.mdb").stat().st_size
    text = lastkd("stats", "--path", path)
    assert text.returncode == 0 and "vectors      32" in text.stdout and "feature sets 2" in text.stdout


def test_default_path_comes_from_settings(filled_store) -> None:
    path, _, _ = filled_store
    result = lastkd("stats", "--json", env={"LASTKD_DATA_DIR": str(path.parent)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == str(path)


def test_ls_lists_sets_with_counts(filled_store) -> None:
    path, a, b = filled_store
    result = lastkd("ls", "--path", path, "--json")
    assert result.returncode == 0, result.stderr
    listed = {m["set_id"]: m for m in json.loads(result.stdout)["sets"]}
    assert set(listed) == {a, b}
    assert (listed[a]["count"], listed[a]["dim"], listed[a]["dtype"], listed[a]["weights_sha256"]) == (
        30,
        768,
        "float16",
        "random-init",
    )
    assert (listed[b]["count"], listed[b]["weights_sha256"]) == (2, "c0" * 32)
    text = lastkd("ls", "--path", path).stdout.splitlines()
    assert text[0].startswith("SET ID") and any(line.startswith(a) and " 30 " in line for line in text[1:])


def test_export_then_verify(filled_store, tmp_path: Path) -> None:
    path, a, b = filled_store
    result = lastkd("export", tmp_path / "snap", "--path", path, "--json")
    assert result.returncode == 0, result.stderr
    exported = json.loads(result.stdout)
    assert exported["sets"] == {a: 30, b: 2} and exported["vectors"] == 32
    verified = lastkd("verify", tmp_path / "snap", "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["sets"] == {a: 30, b: 2}
    only_b = lastkd("export", tmp_path / "snap-b", "--set", b, "--path", path)
    assert only_b.returncode == 0 and f"{b}: 2" in only_b.stdout
    text = lastkd("verify", tmp_path / "snap-b")
    assert text.returncode == 0 and "OK, 2 vectors re-read" in text.stdout


def test_verify_fails_on_tampered_snapshot(filled_store, tmp_path: Path) -> None:
    path, _, _ = filled_store
    assert lastkd("export", tmp_path / "snap", "--path", path).returncode == 0
    data = tmp_path / "snap" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    result = lastkd("verify", tmp_path / "snap")
    assert result.returncode == 1
    assert "failed verification" in result.stderr and "data.mdb: sha256" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stats", "--path", "{tmp}/missing"), "no feature store at"),
        (("ls", "--path", "{tmp}/plain-file"), "is a file, not a feature store directory"),
        (("export", "{tmp}/out", "--path", "{store}", "--set", "nope"), "unknown feature set 'nope'"),
        (("export", "{tmp}/plain-file", "--path", "{store}"), "exists and is not an empty directory"),
        (("verify", "{tmp}/missing"), "missing does not exist"),
        (("verify", "{tmp}/plain-file"), "plain-file is not a directory"),
        (("export", "{tmp}/plain-file/snap", "--path", "{store}"), "plain-file is a file, not a directory"),
        (("export", "{tmp}/out", "--path", "{store}", "--set", ""), "feature set id must be a printable str"),
        (("export", "{tmp}/out", "--path", "{store}", "--set", "a\x01b"), "feature set id must be a printable str"),
        (("verify", "{store}"), "has no manifest.json"),
    ],
)
def test_errors_exit_1_with_a_precise_message(filled_store, tmp_path: Path, args, message: str) -> None:
    path, _, _ = filled_store
    (tmp_path / "plain-file").write_text("not a store")
    result = lastkd(*(a.format(tmp=tmp_path, store=path) for a in args))
    assert result.returncode == 1
    assert result.stderr.startswith(f"lastkd store {args[0]}: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()  # a refused export leaves nothing behind


def test_missing_default_store_names_the_settings(tmp_path: Path) -> None:
    result = lastkd("ls", env={"LASTKD_DATA_DIR": str(tmp_path / "nothing-here")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no feature store at" in result.stderr and "LASTKD_STORE_PATH" in result.stderr and "--path" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert lastkd().returncode == 2
    assert lastkd("bogus").returncode == 2
    assert lastkd("export").returncode == 2  # DEST missing
