"""The one interface every backend implements: submit, status, cancel, logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar, Protocol

from filipctl.contract import RunDir, worker_argv
from filipctl.orchestration.stages import Stage


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def done(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRequest:
    """Everything a backend needs to start one stage."""

    stage: Stage
    run_dir: RunDir  # the run folder shared by all stages (recipe.json, checkpoints, model.pt, logs/)
    env: dict[str, str] = field(default_factory=dict)  # contract.job_env: MLflow run, tracking URI, events file
    after: tuple[str, ...] = ()  # job ids this job waits for (backends with native dependencies)

    @property
    def log_file(self) -> Path:
        return self.run_dir.log(self.stage.name)

    def command(self, python: str) -> list[str]:
        """The argv that runs this stage's job module for one process."""
        return worker_argv(python, self.stage.module, self.run_dir)


class Backend(Protocol):
    name: ClassVar[str]
    # True when the scheduler itself holds dependent jobs (Slurm afterok); False: the CLI
    # submits a stage only after the stages it depends on completed.
    native_dependencies: ClassVar[bool]

    def submit(self, request: JobRequest) -> str:
        """Start (or queue) the job; return its id."""

    def status(self, job_id: str) -> JobState: ...

    def cancel(self, job_id: str) -> None: ...

    def logs(self, job_id: str) -> str:
        """The job's combined stdout/stderr so far."""

    def validate(self, request: JobRequest) -> None:
        """Raise FilipctlError if the job could never run (before anything is queued or tracked)."""

    def describe(self, request: JobRequest) -> str:
        """What would be submitted (the command or batch script), for --dry-run."""
