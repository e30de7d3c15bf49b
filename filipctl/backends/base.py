"""The one interface every backend implements, and the job handle it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from filipctl.contract import RunDir, worker_argv
from filipctl.states import State

if TYPE_CHECKING:
    from filipctl.orchestration.stages import Stage


@dataclass(frozen=True)
class JobRequest:
    """Everything a backend needs to start one stage."""

    stage: "Stage"
    run_dir: RunDir  # the stage's own folder (recipe.json, inputs.json, logs/, its outputs)
    env: dict[str, str] = field(default_factory=dict)  # contract.job_env: MLflow run, tracking URI, events file
    after: tuple["JobHandle", ...] = ()  # jobs this one waits for (backends with native dependencies)

    @property
    def log_file(self) -> Path:
        return self.run_dir.log(self.stage.name)

    def command(self, python: str) -> list[str]:
        """The argv that runs this stage's job module for one process."""
        return worker_argv(python, self.stage.module, self.run_dir)


@dataclass(frozen=True)
class JobHandle:
    """A submitted job, found again from any process by (backend, ref): its state, logs and folder, and cancel.

    `ref` is the backend's own address of the job (a Slurm id and submitit folder, a local job record);
    only the backend that made it reads it. `label` is what a person looks up (a Slurm job id), or "".
    """

    backend: "Backend"
    ref: str
    label: str
    folder: Path  # the stage folder it runs in

    def state(self) -> State:
        return self.backend.poll([self])[self.ref]

    def cancel(self) -> None:
        self.backend.cancel(self)

    def logs(self) -> str:
        return self.backend.logs(self)

    @property
    def result(self) -> Path:
        return RunDir(self.folder).result


class Backend(Protocol):
    name: ClassVar[str]
    # True when the scheduler itself holds dependent jobs (Slurm afterok); False: the executor
    # submits a stage only after the stages it reads from completed.
    native_dependencies: ClassVar[bool]

    def capacity(self) -> tuple[int | None, int | None]:
        """(stages at once, worker processes at once) this backend has room for; None: no limit of that kind."""

    def submit(self, request: JobRequest) -> JobHandle:
        """Start (or queue) the job."""

    def attach(self, ref: str) -> JobHandle:
        """The handle of a job submitted earlier, maybe by another process, from its `ref`."""

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        """The state of each job (by ref), asked of the scheduler at once: one query for all of them."""

    def cancel(self, handle: JobHandle) -> None: ...

    def logs(self, handle: JobHandle) -> str:
        """The job's combined stdout/stderr so far."""

    def validate(self, request: JobRequest) -> None:
        """Raise FilipctlError if the job could never run (before anything is queued or tracked)."""

    def describe(self, request: JobRequest) -> str:
        """What would be submitted (the command or batch script), for --dry-run."""
