"""``POST /experiments`` through a live API and a real worker: arms x seeds as child jobs, the
paired report built from those jobs, cancel reaching every child, bad bodies refused whole."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

import httpx
import pytest

from lastkd.services.client import TrainerClient
from tests.support.stack import Stack, TinyData, tiny_config

T95 = {1: 12.706204736174707}  # two-sided 95% Student t, 1 degree of freedom (2 seeds)


def _experiment(data: TinyData, name: str, **extra: Any) -> dict[str, Any]:
    base = tiny_config(data, name, samples=4, steps=1)
    return {"name": name, "base": base, "seeds": [0, 1], **extra}


def _wait(c: httpx.Client, experiment_id: str, states: set[str], timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(f"/experiments/{experiment_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} did not reach {states}: {body}")


def _interval(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    m = sum(values) / n
    half = T95[n - 1] * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return m, m - half, m + half


def test_three_arms_two_seeds_run_as_jobs_and_the_report_equals_the_children(
    embedded_stack: Stack, tiny_data: TinyData
) -> None:
    name = f"exp-{uuid.uuid4().hex[:6]}"
    with embedded_stack.client() as c:
        r = c.post("/experiments", json=_experiment(tiny_data, name), headers={"Idempotency-Key": name})
        assert r.status_code == 202, r.text
        submitted = r.json()
        assert submitted["created"] is True and len(submitted["children"]) == 6
        assert {(k["arm"], k["seed"]) for k in submitted["children"]} == {
            (a, s) for a in ("ce", "kd", "kd-shuffled") for s in (0, 1)
        }
        again = c.post("/experiments", json=_experiment(tiny_data, name), headers={"Idempotency-Key": name})
        assert again.json()["experiment_id"] == submitted["experiment_id"] and again.json()["created"] is False

        done = _wait(c, submitted["experiment_id"], {"COMPLETED", "FAILED", "CANCELLED"})
        assert done["state"] == "COMPLETED", done
        # the children are ordinary jobs: read them through the jobs API, independently of the report
        jobs = {(k["arm"], k["seed"]): c.get(f"/jobs/{k['job_id']}").json() for k in done["children"]}
        assert all(j["state"] == "COMPLETED" and j["config"]["seed"] == s for (_, s), j in jobs.items())
        assert jobs[("ce", 0)]["name"] == f"{name}-ce-s0"
        report = done["report"]
        assert report["experiment_id"] == submitted["experiment_id"]
        for child in report["children"]:  # each child's own figures, and the job that ran it
            job = jobs[(child["arm"], child["seed"])]
            assert child["job_id"] == job["job_id"] and child["top1"] == job["metrics"]["top1"]
        for arm in ("ce", "kd", "kd-shuffled"):
            m, lo, hi = _interval([jobs[(arm, s)]["metrics"]["top1"] for s in (0, 1)])
            iv = report["per_arm"][arm]["top1"]
            assert iv["mean"] == pytest.approx(m, abs=1e-12) and iv["lo"] == pytest.approx(lo, abs=1e-6)
            assert iv["hi"] == pytest.approx(hi, abs=1e-6)
        for arm in ("kd", "kd-shuffled"):
            diffs = [jobs[(arm, s)]["metrics"]["top1"] - jobs[("ce", s)]["metrics"]["top1"] for s in (0, 1)]
            assert report["paired"][arm]["top1"]["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
            losses = [jobs[(arm, s)]["history"][-1]["train_distill"] for s in (0, 1)]
            assert report["per_arm"][arm]["final_distill_loss"]["mean"] == pytest.approx(sum(losses) / 2, abs=1e-9)
        # the report's files, kept in the registry beside the students and served by the API
        md = c.get(f"/experiments/{submitted['experiment_id']}/files/report.md")
        assert md.status_code == 200 and md.text.startswith(f"# Experiment {name}")
        served = c.get(f"/experiments/{submitted['experiment_id']}/files/report.json").json()
        assert served["per_arm"] == report["per_arm"]
        assert c.get(f"/experiments/{submitted['experiment_id']}/files/../../jobs.sqlite").status_code == 404
        listed = c.get("/experiments").json()["experiments"]
        assert submitted["experiment_id"] in [e["experiment_id"] for e in listed]
        # the students the children published are in the checkpoint list like any other
        names = {cp["name"] for cp in c.get("/checkpoints").json()["checkpoints"]}
        assert {f"{name}-{a}-s{s}" for a in ("ce", "kd", "kd-shuffled") for s in (0, 1)} <= names


def test_a_cancelled_experiment_cancels_its_children(embedded_stack: Stack, tiny_data: TinyData) -> None:
    name = f"cx-{uuid.uuid4().hex[:6]}"
    body = _experiment(tiny_data, name)
    body["base"].update(epochs=50, max_steps_per_epoch=None)  # long enough to be running when cancelled
    with embedded_stack.client() as c:
        submitted = c.post("/experiments", json=body).json()
        experiment_id = submitted["experiment_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # one child running, the others queued
            states = {k["state"] for k in c.get(f"/experiments/{experiment_id}").json()["children"]}
            if "RUNNING" in states:
                break
            time.sleep(0.2)
        r = c.post(f"/experiments/{experiment_id}/cancel")
        assert r.status_code in (200, 202), r.text
        done = _wait(c, experiment_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=180)
        assert done["state"] == "CANCELLED" and done["report"] is None
        assert all(k["state"] == "CANCELLED" for k in done["children"]), done["children"]
        assert c.post(f"/experiments/{experiment_id}/cancel").status_code == 200  # already cancelled: same answer


def test_the_typed_client_follows_an_experiment_over_events(embedded_stack: Stack, tiny_data: TinyData) -> None:
    """The event stream ends with the terminal experiment (SSE parsed by the one parser)."""
    name = f"ev-{uuid.uuid4().hex[:6]}"
    body = _experiment(tiny_data, name, arms={"ce": {"distill": {"alpha_start": 0.0, "alpha_end": 0.0}}, "kd": {}})
    body["seeds"] = [0]
    with embedded_stack.client() as c:
        experiment_id = c.post("/experiments", json=body).json()["experiment_id"]
    with TrainerClient(embedded_stack.url, token=None) as client:
        events = list(client.experiment_events(experiment_id))
    assert events[-1].event == "end" and events[-1].data["state"] == "COMPLETED"
    assert all(e.event == "progress" for e in events[:-1])


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda b: b.update(seeds=[0, 0]), "seeds"),
        (lambda b: b.update(arms={"kd": {"name": "x"}}), "arms.kd.name"),
        (lambda b: b.update(baseline="nope"), "baseline"),
        (lambda b: b["base"].update(epochs=0), "base.epochs"),
        (lambda b: b["base"]["data"].update(path="../../etc"), "base.data.path"),
        (lambda b: b.update(arms={"kd": {"data": {"path": "/etc"}}}), "arms.kd.data.path"),
    ],
)
def test_bad_experiments_are_refused_whole_naming_the_field(
    embedded_stack: Stack, tiny_data: TinyData, mutate, words: str
) -> None:
    body = _experiment(tiny_data, f"bad-{uuid.uuid4().hex[:6]}")
    mutate(body)
    with embedded_stack.client() as c:
        before = len(c.get("/jobs", params={"limit": 1000}).json()["jobs"])
        r = c.post("/experiments", json=body)
        assert r.status_code in (403, 422), r.text
        assert words in r.json()["error"]["message"], r.json()
        assert len(c.get("/jobs", params={"limit": 1000}).json()["jobs"]) == before  # no child created
        for raw in (b"", b"[1]", b"{not json", json.dumps({"name": "x"}).encode()):
            assert c.post("/experiments", content=raw, headers={"content-type": "application/json"}).status_code == 422
