"""The executor: a pure state machine over the stage graph.

From what is known (done records of earlier runs, the jobs' states as the scheduler reports them,
a Ctrl-C) it decides what to reuse, what to submit and when, what to cancel and what will never
run. It does no I/O: it prints nothing, calls no scheduler and no MLflow. `runner.Runner` applies
its decisions; the tracking sink and the progress view subscribe to its transitions.

    PENDING --submit--> QUEUED --> RUNNING --> COMPLETED
       |                  |           +------> FAILED | CANCELLED  (what reads from it: SKIPPED)
       +-> CACHED         +-- interrupt --> CANCELLED
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from filipctl.states import State

ACTIVE = (State.QUEUED, State.RUNNING)


@dataclass(frozen=True)
class Step:
    """A stage as the executor sees it."""

    key: str
    deps: tuple[str, ...] = ()  # keys of the steps it reads from
    processes: int = 1  # worker processes it runs: a local stage takes that many cores


@dataclass(frozen=True)
class DoneRecord:
    """A stage folder's done.json as far as reuse is concerned."""

    id: str  # new each time the stage completes: a stage read from it must have been made from this one
    inputs: dict[str, str]  # dependency key -> id of the record it was made from


@dataclass(frozen=True)
class Submit:
    key: str
    after: tuple[str, ...] = ()  # submitted dependencies the scheduler must hold it for (native dependencies)


@dataclass(frozen=True)
class Cancel:
    key: str


Decision = Union[Submit, Cancel]
Listener = Callable[[str, State, State], None]


@dataclass(frozen=True)
class Limits:
    """Room on the backend: stages at once, worker processes at once (None: no limit of that kind).

    A stage larger than `processes` alone still runs, alone: it can never fit better.
    """

    stages: int | None = None
    processes: int | None = None


class Executor:
    def __init__(self, steps: dict[str, Step], records: dict[str, DoneRecord | None] | None = None, *,
                 force: bool = False, native_dependencies: bool = False, limits: Limits = Limits()) -> None:
        self.steps = steps  # in a topological order: dependencies first
        self.records = records or {}
        self.force = force
        self.native = native_dependencies
        self.limits = limits
        self.state: dict[str, State] = {k: State.PENDING for k in steps}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """`listener(key, old, new)` is called on every change of a stage's state, in order."""
        self._listeners.append(listener)

    # -- decisions ----------------------------------------------------------------------------------

    def reusable(self) -> dict[str, DoneRecord]:
        """The done records to reuse: present, and made from exactly the dependency results that stand now."""
        out: dict[str, DoneRecord] = {}
        if self.force:
            return out
        for key, step in self.steps.items():
            record = self.records.get(key)
            if record is not None and all(d in out and record.inputs.get(d) == out[d].id for d in step.deps):
                out[key] = record
        return out

    def start(self) -> list[Decision]:
        for key in self.reusable():
            self._set(key, State.CACHED)
        return self._fill()

    def observe(self, key: str, job: State) -> list[Decision]:
        """The scheduler's word on a submitted job -> what to do now."""
        if self.state[key].ended or job in (State.PENDING, State.QUEUED, State.UNKNOWN):
            return []  # a report after the end (a cancel raced the exit), or nothing new
        if job is State.RUNNING:
            self._set(key, State.RUNNING)
            return []
        if job is State.COMPLETED:
            self._set(key, State.COMPLETED)
            return self._fill()
        self._set(key, State.CANCELLED if job is State.CANCELLED else State.FAILED)
        return self._skip(self.downstream(key)) + self._fill()

    def interrupt(self) -> list[Decision]:
        """Ctrl-C or a submission refused: cancel what was submitted, and nothing else starts."""
        return self._skip([k for k in self.steps if not self.state[k].ended], submitted=State.CANCELLED)

    # -- what the runner and views read ----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(s.ended for s in self.state.values())

    @property
    def active(self) -> list[str]:
        return [k for k, s in self.state.items() if s in ACTIVE]

    def downstream(self, key: str) -> list[str]:
        """Every step that reads from `key`, directly or through others, in order."""
        out: list[str] = []
        frontier = {key}
        for k, step in self.steps.items():
            if frontier & set(step.deps):
                out.append(k)
                frontier.add(k)
        return out

    # -- inside -----------------------------------------------------------------------------------------

    def _set(self, key: str, new: State) -> None:
        old = self.state[key]
        if old is new:
            return
        self.state[key] = new
        for listener in self._listeners:
            listener(key, old, new)

    def _ready(self, step: Step) -> bool:
        deps = [self.state[d] for d in step.deps]
        if all(s.ok for s in deps):
            return True
        # A scheduler that holds a job until its inputs completed takes it as soon as they are queued.
        return self.native and all(s.ok or s in ACTIVE for s in deps)

    def _room(self, step: Step) -> bool:
        active = self.active
        if self.limits.stages is not None and len(active) >= self.limits.stages:
            return False
        used = sum(self.steps[k].processes for k in active)
        return self.limits.processes is None or not active or used + step.processes <= self.limits.processes

    def _fill(self) -> list[Decision]:
        """Submit every pending step whose inputs allow it, in order, while there is room."""
        out: list[Decision] = []
        for key, step in self.steps.items():
            if self.state[key] is State.PENDING and self._ready(step) and self._room(step):
                after = tuple(d for d in step.deps if self.state[d] in ACTIVE)
                self._set(key, State.QUEUED)
                out.append(Submit(key, after))
        return out

    def _skip(self, keys: list[str], submitted: State = State.SKIPPED) -> list[Decision]:
        """Steps that will not run: those submitted are cancelled (and end as `submitted`), the rest SKIPPED."""
        out: list[Decision] = []
        for key in keys:
            if self.state[key].ended:
                continue
            if self.state[key] in ACTIVE:
                out.append(Cancel(key))
                self._set(key, submitted)
            else:
                self._set(key, State.SKIPPED)
        return out
