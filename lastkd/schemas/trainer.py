"""The trainer service's contract: jobs, their events, published students, readiness."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "TERMINAL",
    "CheckpointDetail",
    "CheckpointEntry",
    "CheckpointList",
    "Experiment",
    "ExperimentChild",
    "ExperimentList",
    "ExperimentSubmitted",
    "Job",
    "JobEvent",
    "JobKind",
    "JobList",
    "JobState",
    "JobSubmitted",
    "TrainerReady",
]


class JobState(StrEnum):
    """Life cycle of a job: PENDING (recorded) -> QUEUED (handed to the broker) -> RUNNING ->
    one of the three terminal states."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
"""The states after which nothing about a job changes."""


class JobKind(StrEnum):
    """What a job runs: a student's training (``POST /train``) or the teacher's fine-tuning
    (``POST /teacher/finetune``); both go through the same queue, workers and records."""

    TRAIN = "train"
    TEACHER_FINETUNE = "teacher_finetune"


class Job(BaseModel):
    """One training job as the API reports it."""

    job_id: str
    name: str
    state: JobState
    kind: JobKind = Field(JobKind.TRAIN, description="train (a student) or teacher_finetune (the teacher).")
    progress: dict[str, Any] | None = Field(description="The latest progress report (epoch, step, loss, ...).")
    metrics: dict[str, Any] | None = Field(description="Evaluation metrics, per epoch and final.")
    history: list[dict[str, Any]] = Field(description="Per-epoch training history (losses, validation), oldest first.")
    result: dict[str, Any] | None = Field(description="What a COMPLETED job published (name, version, path).")
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    resumed_from_epoch: int | None
    idempotency_key: str | None
    created_at: float
    updated_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    config: dict[str, Any] = Field(
        description="The config the job runs, as validated: a TrainConfig, or a FinetuneConfig for teacher_finetune."
    )
    data_skipped: dict[str, Any] | None = Field(
        None, description="Source files the readers skipped, and why (lifted out of metrics so nobody misses it)."
    )
    status_url: str


class JobSubmitted(Job):
    """``POST /train``: the job, whether this request ``created`` it (False: an idempotent
    replay), and warnings about what the API could not check."""

    created: bool
    warnings: list[str]


class JobList(BaseModel):
    """``GET /jobs``: newest first."""

    jobs: list[Job]
    count: int


class JobEvent(BaseModel):
    """The data of each ``progress`` and the final ``end`` server-sent event of ``/jobs/{id}/events``."""

    job_id: str
    state: JobState
    progress: dict[str, Any] | None
    attempts: int
    error: str | None
    result: dict[str, Any] | None


class CheckpointEntry(BaseModel):
    """One published student version in ``GET /checkpoints``."""

    name: str
    version: int
    job_id: str | None
    created: str | None
    top1: float | None
    url: str


class CheckpointList(BaseModel):
    """``GET /checkpoints``: every published version."""

    checkpoints: list[CheckpointEntry]
    count: int


class CheckpointDetail(BaseModel):
    """``GET /checkpoints/{name}/{version}``: the student's config, lineage, final metrics and files."""

    name: str
    version: int
    student: dict[str, Any] | None = Field(description="config.json: the LAST v2 architecture.")
    lineage: dict[str, Any] | None = Field(description="Job, data, teacher feature set and code version.")
    metrics: dict[str, Any] | None = Field(description="The final evaluation.")
    files: list[str]
    files_url: str


class ExperimentChild(BaseModel):
    """One (arm, seed) child job of an experiment."""

    arm: str
    seed: int
    job_id: str
    state: JobState
    top1: float | None = Field(None, description="The child's final val top-1 once it completed.")


class Experiment(BaseModel):
    """An experiment: arms x seeds of one config as child jobs, and its paired report once done.

    ``state`` is QUEUED until a child runs, RUNNING while any child has to finish, then COMPLETED
    (report written), FAILED (a child failed; the others are cancelled) or CANCELLED."""

    experiment_id: str
    name: str
    state: JobState
    arms: list[str]
    seeds: list[int]
    baseline: str
    children: list[ExperimentChild]
    done: int = Field(description="Children in a terminal state.")
    error: str | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    finished_at: float | None
    report: dict[str, Any] | None = Field(description="The paired report (report.json), once COMPLETED.")
    report_dir: str | None = Field(description="Where report.json, report.md and plots/ are kept.")
    status_url: str


class ExperimentSubmitted(Experiment):
    """``POST /experiments``: the experiment, whether this request ``created`` it, and warnings."""

    created: bool
    warnings: list[str]


class ExperimentList(BaseModel):
    """``GET /experiments``: newest first (without reports)."""

    experiments: list[Experiment]
    count: int


class TrainerReady(BaseModel):
    """``GET /health/ready``: 200 when the job database and the broker answer, else 503 with
    ``problems`` naming what does not."""

    status: Literal["ready", "not_ready"]
    broker: str | None = None
    queue: str | None = None
    problems: dict[str, str] | None = None
