"""``lastkd demo`` end to end through the real CLI: synthetic data + the real NTU sample, the
embedded stack (teacher API, trainer API, Celery worker) with a tiny random-init teacher, every
clip through POST /embed, a distillation job through POST /train, a published student.

The checks are independent of the demo's own report where possible: the student is loaded
strict into LAST v2 from its safetensors, every video is looked up in the LMDB feature store the
teacher wrote, the PNGs are checked by signature, and the labelling comes from lineage.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lastkd.services.demo_data import prepare_dataset
from lastkd.services.demo_errors import DemoError
from tests.support.live import descendants, free_port, kill_all, port_free, running
from tests.support.paths import NTU_SAMPLE_DIR, PROJECT_ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTKD_")}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        LASTKD_TEACHER_MODEL="videomae_v2_tiny",  # the demo's ViT-B is minutes of CPU; same code path
        LASTKD_TEACHER_DEVICE="cpu",
        LASTKD_DECODE_WORKERS="1",
        LASTKD_STORE_MAP_SIZE=str(64 << 20),
        LASTKD_TEACHER_PORT=str(free_port()),
        LASTKD_TRAINER_PORT=str(free_port()),
        OMP_NUM_THREADS="2",
    )
    env.update(overrides)
    return env


def run_demo(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 420
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lastkd.services.cli", "demo", *args],
        cwd=cwd,
        env=env or demo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(720)
def test_demo_goes_from_nothing_to_a_published_student(tmp_path: Path) -> None:
    from lastkd.featurestore import FeatureStore
    from lastkd.models.last_v2 import LASTv2
    from lastkd.student.publish import load_student

    env = demo_env()
    out = tmp_path / "demo"
    result = run_demo(
        tmp_path,
        "--out",
        str(out),
        "--classes",
        "2",
        "--samples-per-class",
        "4",
        "--epochs",
        "1",
        "--student-frames",
        "16",
        "--compare",
        env=env,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    # --compare: ce vs kd as an experiment over the job system, its paired difference in words,
    # and the plain statement that a random-init teacher carries no class information (measured)
    compare = text[text.index("Distillation against its baseline") :]
    assert re.search(r"ce\s+val top-1 [\d.]+% over 2 seed", compare) and re.search(r"kd\s+val top-1", compare)
    assert "within noise" in compare or "real difference" in compare, compare
    cosines = re.search(r"mean cosine (-?[\d.]+) within a class vs (-?[\d.]+) between classes", compare)
    assert cosines and all(-1.0 <= float(v) <= 1.0 for v in cosines.groups()), compare
    report_md = Path(re.search(r"report: (\S+report\.md)", compare).group(1))
    assert report_md.parent.parent == out / "registry" / "_experiments" and report_md.read_text().startswith(
        "# Experiment"
    )

    # Labelled plainly, at the start and again at the end.
    assert text.count("RANDOM-INIT") >= 2 and text.count("SYNTHETIC") >= 2, text
    notice = text.index("RANDOM-INIT")
    assert notice < text.index("[1/4]") and text.rindex("SYNTHETIC") > text.index("Published student")
    assert "LASTKD_TEACHER_WEIGHTS" in text and "docs/train_example.yaml" in text
    # The accuracy line says in words how the student compares with chance.
    top1_line = [line for line in text.splitlines() if line.startswith("  val top-1")][-1]
    assert "above chance" in top1_line or "NOT distinguishable from chance" in top1_line, top1_line

    # The dataset: synthetic videos plus the real NTU sample (which replaces its synthetic namesake).
    datasets = out / "datasets"
    (dataset,) = [d for d in datasets.iterdir() if d.is_dir() and not d.name.startswith(".")]
    videos = sorted(p.name for p in (dataset / "videos").glob("*_rgb.avi"))
    assert len(videos) == 2 * 4
    real = NTU_SAMPLE_DIR / "S001C001P001R001A001_rgb.avi"
    assert (dataset / "videos" / real.name).read_bytes() == real.read_bytes()
    assert json.loads((dataset / "synthetic.json").read_text())["synthetic"] is True

    # Every clip went through POST /embed into the store, under its NTU sample name.
    match = re.search(r"feature set (\S+)", text)
    assert match, text
    set_id = match.group(1)
    assert "videomae_v2_tiny" in set_id and "random-init" in set_id
    store = FeatureStore(out / "stores" / f"{dataset.name}.lmdb", readonly=True)
    try:
        ids = [v[: -len("_rgb.avi")] for v in videos]
        arr, found = store.get_many(set_id, ids)
        assert bool(found.all()), dict(zip(ids, found.tolist()))
        assert arr.shape == (len(ids), 96)  # the tiny teacher's width
    finally:
        store.close()

    # The published student: strict into LAST v2, via the registry helper and by hand.
    folder = Path(re.search(r"folder\s+(\S+)", text).group(1))
    assert folder.parent.parent == out / "registry" and folder.is_dir()
    student = load_student(folder)
    assert isinstance(student, LASTv2)
    meta = json.loads((folder / "config.json").read_text())
    model = LASTv2(num_classes=meta["num_classes"], variant=meta["variant"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    # The per-stream BatchNorm statistics the run recomputed travel beside the weights.
    model.set_stream_bn_stats(load_file(str(folder / "stream_bn.safetensors")))
    x = {s: torch.zeros(1, 3, 16, 25, 2) for s in meta["streams"]}
    with torch.no_grad():
        assert torch.equal(model.eval()(x), student(x))
    assert not any(k.startswith("projector") for k in load_file(str(folder / "model.safetensors")))

    # Metrics and plots exist and say what was trained.
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["top1"] <= 1.0
    assert metrics["final"]["coverage_train"] == 1.0 and metrics["final"]["coverage_val"] == 1.0
    pngs = list((folder / "plots").glob("*.png"))
    assert {"loss.png", "accuracy.png"} <= {p.name for p in pngs}
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in pngs)
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["teacher_random_init"] is True and lineage["synthetic_data"] is True
    assert lineage["feature_set"] == set_id
    card = (folder / "README.md").read_text()
    assert "SYNTHETIC" in card and "RANDOM-INIT" in card

    # The demo's own stack is gone: its ports are free again.
    assert port_free(int(env["LASTKD_TEACHER_PORT"])) and port_free(int(env["LASTKD_TRAINER_PORT"]))


@pytest.mark.timeout(300)
def test_ctrl_c_during_training_stops_the_demo_stack(tmp_path: Path) -> None:
    env = demo_env()
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lastkd.services.cli",
                "demo",
                "--out",
                str(tmp_path / "demo"),
                "--classes",
                "2",
                "--samples-per-class",
                "4",
                "--epochs",
                "3",
                "--student-frames",
                "16",
                "--no-ntu-sample",
            ],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while "[4/4]" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        assert "[4/4]" in log_path.read_text(), log_path.read_text()
        pids = descendants(proc.pid)
        assert len(pids) >= 3  # teacher, trainer, worker (and their sub-processes)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(p for p in pids if running(p))
    out = log_path.read_text()
    assert code == 130, out
    assert "interrupted; the demo stack was stopped" in out
    assert not [p for p in pids if running(p)], out
    assert port_free(int(env["LASTKD_TEACHER_PORT"])) and port_free(int(env["LASTKD_TRAINER_PORT"]))


def test_a_running_teacher_with_real_weights_is_refused(tmp_path: Path) -> None:
    """Official weights cannot exist here, so a stand-in answers /health/ready the way a teacher
    with weights does; the demo must refuse before writing data or uploading a clip."""
    import http.server
    import threading

    seen: list[str] = []

    class Teacher(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            seen.append(f"GET {self.path}")
            body = json.dumps({"status": "ready", "model": "videomae_v2_vit_b", "random_init": False}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            seen.append(f"POST {self.path}")
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = demo_env(LASTKD_DATA_DIR=str(tmp_path / "data"))
        result = run_demo(tmp_path, "--teacher-url", url, "--trainer-url", "http://127.0.0.1:9", env=env, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "runs with real weights" in result.stdout and "refuses to mix" in result.stdout
    assert seen == ["GET /health/ready"]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("--classes", "1"), {}, "--classes must be 2..60"),
        (("--samples-per-class", "3"), {}, "--samples-per-class must be 4..200"),
        (("--epochs", "0"), {}, "--epochs must be 1..100"),
        (("--concurrency", "0"), {}, "--concurrency must be 1..32"),
        (("--name", "../evil"), {}, "--name '../evil'"),
        (("--teacher-url", "http://127.0.0.1:1"), {}, "--teacher-url and --trainer-url go together"),
        (
            ("--teacher-url", "file:///etc/passwd", "--trainer-url", "http://127.0.0.1:1"),
            {},
            "--teacher-url must look like",
        ),
        ((), {"LASTKD_TEACHER_MODEL": "videomae_v2_vit_g"}, "too large for a CPU demo"),
        (("--teacher-model", "resnet50"), {}, "invalid choice: 'resnet50'"),
    ],
)
def test_bad_flags_are_refused_before_anything_is_written(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    out = tmp_path / "demo"
    result = run_demo(tmp_path, "--out", str(out), *args, env=demo_env(**env), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert not out.exists()


def test_out_must_be_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a folder")
    result = run_demo(tmp_path, "--out", str(target), env=demo_env(), timeout=60)
    assert result.returncode == 2 and "is not a folder" in result.stderr
    assert target.read_text() == "not a folder"


def test_a_foreign_folder_is_never_overwritten(tmp_path: Path) -> None:
    foreign = tmp_path / "demo-c2-k4-f120-s0"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="was not made by `lastkd demo`"):
        prepare_dataset(tmp_path, classes=2, samples_per_class=4, ntu_sample=None)
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-c2-k4-f120-s0"]  # no staging left behind


def test_dataset_is_reused_when_complete_and_rebuilt_when_not(tmp_path: Path) -> None:
    first = prepare_dataset(tmp_path, classes=2, samples_per_class=4, frames=36, ntu_sample=NTU_SAMPLE_DIR)
    assert not first.reused and len(first.clips) == 8 and first.real_samples == ("S001C001P001R001A001",)
    # 60 names: the student is an NTU-60 model whatever the demo's class count.
    assert len(first.label_map.read_text().splitlines()) == 60
    stamp = (first.root / "demo.json").stat().st_mtime_ns
    again = prepare_dataset(tmp_path, classes=2, samples_per_class=4, frames=36, ntu_sample=NTU_SAMPLE_DIR)
    assert again.reused and again.root == first.root and (first.root / "demo.json").stat().st_mtime_ns == stamp
    # An interrupted build (no marker) is ours and incomplete: rebuilt, not trusted.
    (first.root / "demo.json").unlink()
    (first.root / "videos" / first.clips[0].name).unlink()
    rebuilt = prepare_dataset(tmp_path, classes=2, samples_per_class=4, frames=36, ntu_sample=NTU_SAMPLE_DIR)
    assert not rebuilt.reused and len(rebuilt.clips) == 8


def test_the_real_data_example_config_validates() -> None:
    from lastkd.student.config import TrainConfig

    config = TrainConfig.from_yaml(PROJECT_ROOT / "docs" / "train_example.yaml")
    # What the README promises it is: a real-data NTU-60 distillation run, not the demo's.
    assert config.data.format == "ntu_raw" and config.data.dataset == "ntu60"
    assert config.distill.enabled and "random-init" not in (config.distill.feature_set or "")
    assert config.data.streams == ("joint", "velocity", "bone")


@pytest.mark.parametrize(
    ("top1", "samples", "classes", "words"),
    [
        # chance 20%, two binomial standard errors on 100 samples = 2 * sqrt(0.2 * 0.8 / 100) = 8 points
        (0.29, 100, 5, "above chance"),
        (0.27, 100, 5, "NOT distinguishable from chance"),
        # six val samples: 2 * sqrt(0.16 / 6) = 32.7 points, so even 50% is not evidence of learning
        (0.50, 6, 5, "NOT distinguishable from chance"),
        (1.00, 6, 5, "above chance"),
        (None, 0, 5, "no validation samples"),
    ],
)
def test_the_summary_says_plainly_whether_the_student_beat_chance(
    top1: float | None, samples: int, classes: int, words: str
) -> None:
    from lastkd.services.demo_console import accuracy_verdict

    verdict = accuracy_verdict(top1, samples, classes)
    assert verdict.startswith(words), verdict


@pytest.mark.timeout(720)
def test_demo_with_a_fine_tuned_teacher_embeds_with_it(tmp_path: Path) -> None:
    """``--finetune-teacher``: the tiny teacher is fine-tuned on the RGB train split (person crop),
    published under _teachers, and the stack embeds with it: the feature set is named by its
    weights and its crop, not random-init, and the summary says so."""
    from lastkd.featurestore import FeatureStore

    out = tmp_path / "demo"
    args = ("--out", str(out), "--classes", "2", "--samples-per-class", "4", "--epochs", "1")
    result = run_demo(
        tmp_path, *args, "--finetune-teacher", "--teacher-epochs", "20", "--compare", "--compare-seeds", "1"
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    teacher_line = re.search(r"teacher videomae_v2_tiny fine-tuned in \S+: val top-1 ([\d.]+)% .*published (\S+)", text)
    assert teacher_line, text
    (folder,) = (out / "registry" / "_teachers").iterdir()
    assert folder.name == teacher_line.group(2) and (folder / "teacher.pth").is_file()
    lineage = json.loads((folder / "lineage.json").read_text())
    set_id = re.search(r"feature set (\S+)", text).group(1)
    assert lineage["teacher_sha256"][:12] in set_id and "random-init" not in set_id
    assert "FINE-TUNED HERE" in text and text.count("RANDOM-INIT") == 0, text
    assert "the teacher was fine-tuned here" in text[text.index("Distillation against its baseline") :]
    (store_path,) = (out / "stores").glob("*.lmdb")
    store = FeatureStore(store_path, readonly=True)
    try:
        meta = store.get_set(set_id)
    finally:
        store.close()
    assert meta.preprocessing["spatial"] == "person_box" and meta.dim == 96 and meta.weights_sha256
    # a second run reuses the run and the published teacher (same weights: same folder)
    again = run_demo(tmp_path, *args, "--finetune-teacher", "--teacher-epochs", "20")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [p.name for p in (out / "registry" / "_teachers").iterdir()] == [folder.name]
