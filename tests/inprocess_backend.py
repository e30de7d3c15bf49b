"""A TEST DOUBLE of a backend, for the control plane's tests: jobs that "run" in this process, in milliseconds.

Each job follows a script: queued for `queued_polls` polls, running for `running_polls`, then it
ends as its stage's scripted outcome (COMPLETED writes a result.json into the stage folder, as a
real job does). Nothing is started. The real backends keep their real tests (tests/test_slurm*.py,
tests/test_ray.py, tests/test_cli.py); this one exists so that every decision of the executor and
the runner can be tested without paying for torchrun, DeepSpeed and MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from filipctl.backends.base import JobHandle, JobRequest
from filipctl.contract import write_result
from filipctl.states import State


@dataclass
class ScriptedJob:
    request: JobRequest
    outcome: State
    queued_polls: int
    running_polls: int
    polls: int = 0
    cancelled: bool = False
    log: list[str] = field(default_factory=list)


class InProcessTestBackend:
    name: ClassVar[str] = "inprocess-test"
    native_dependencies: ClassVar[bool] = False

    def __init__(self, outcomes: dict[str, State] | None = None, max_stages: int | None = None,
                 max_processes: int | None = None, native: bool = False, queued_polls: int = 0,
                 running_polls: int = 1,
                 metrics: dict[str, dict[str, float]] | Callable[[JobRequest], dict[str, float]] | None = None,
                 refuse: set[str] | None = None, write_result: bool = True) -> None:
        self.outcomes = outcomes or {}  # stage name -> how its jobs end (default COMPLETED)
        self.metrics = metrics or {}  # stage name -> the metrics its result.json holds (or a function of the job)
        self.limits = (max_stages, max_processes)
        self.native_dependencies = native  # type: ignore[misc]  (per instance: both kinds are tested)
        self.queued_polls, self.running_polls = queued_polls, running_polls
        self.refuse = refuse or set()  # stage names whose submission the "scheduler" refuses
        self.writes_result = write_result
        self.jobs: dict[str, ScriptedJob] = {}
        self.submitted: list[str] = []  # stage folder names, in submission order
        self.after: dict[str, tuple[str, ...]] = {}  # stage folder name -> folder names it waits for
        self.poll_calls = 0
        self.running_at_once = 0  # the most jobs seen RUNNING in one poll

    def capacity(self) -> tuple[int | None, int | None]:
        return self.limits

    def submit(self, request: JobRequest) -> JobHandle:
        from filipctl.errors import FilipctlError

        if request.stage.name in self.refuse:
            raise FilipctlError(f"the test scheduler refused the {request.stage.name} job")
        ref = f"job{len(self.jobs)}"
        self.jobs[ref] = ScriptedJob(request, self.outcomes.get(request.stage.name, State.COMPLETED),
                                     self.queued_polls, self.running_polls)
        self.submitted.append(request.run_dir.root.name)
        self.after[request.run_dir.root.name] = tuple(h.folder.name for h in request.after)
        return JobHandle(self, ref, ref, request.run_dir.root)

    def attach(self, ref: str) -> JobHandle:
        return JobHandle(self, ref, ref, self.jobs[ref].request.run_dir.root)

    def _advance(self, job: ScriptedJob) -> State:
        if job.cancelled:
            return State.CANCELLED
        if any(self.jobs[h.ref].outcome is not State.COMPLETED or self.jobs[h.ref].polls <= self._length(h.ref)
               for h in job.request.after):
            return State.QUEUED  # held by the scheduler until what it waits for completed (afterok)
        job.polls += 1
        if job.polls <= job.queued_polls:
            return State.QUEUED
        if job.polls <= job.queued_polls + job.running_polls:
            return State.RUNNING
        run_dir = job.request.run_dir
        if job.outcome is State.COMPLETED and self.writes_result and not run_dir.result.exists():
            if job.request.stage.name == "data":  # an index of no shards: nothing a reuse check could find changed
                run_dir.data_index.write_text('{"train": [], "eval": null}')
            metrics = self.metrics(job.request) if callable(self.metrics) else self.metrics.get(job.request.stage.name)
            write_result(run_dir, metrics or {"steps": 1.0})
        return job.outcome

    def _length(self, ref: str) -> int:
        job = self.jobs[ref]
        return job.queued_polls + job.running_polls

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        self.poll_calls += 1
        states = {h.ref: self._advance(self.jobs[h.ref]) for h in handles}
        self.running_at_once = max(self.running_at_once, sum(s is State.RUNNING for s in states.values()))
        return states

    def cancel(self, handle: JobHandle) -> None:
        self.jobs[handle.ref].cancelled = True

    def logs(self, handle: JobHandle) -> str:
        return f"log of {handle.ref}\nerror: scripted {self.jobs[handle.ref].outcome.value.lower()}\n"

    def validate(self, request: JobRequest) -> None:
        return None

    def describe(self, request: JobRequest) -> str:
        return f"(in-process test job {request.stage.name})"
