"""The one vocabulary of states, from a scheduler's job to the MLflow run a person opens.

Backends report jobs in it, the executor decides in it, the state index stores it and `filipctl
status` shows it; MLflow's own statuses are a view of it (`MLFLOW_STATUS`), written only by the
tracking sink.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    PENDING = "PENDING"  # not submitted yet: waiting for the stages it reads from, or for room
    QUEUED = "QUEUED"  # submitted; the scheduler has not started it
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"  # ran to the end; its result.json is in its stage folder
    CACHED = "CACHED"  # done before under the same key: reused, not run
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"  # stopped on request: Ctrl-C, `filipctl cancel`, the scheduler
    SKIPPED = "SKIPPED"  # never run: a stage it reads from did not complete
    UNKNOWN = "UNKNOWN"  # the scheduler cannot say (yet)

    @property
    def ended(self) -> bool:
        return self in ENDED

    @property
    def ok(self) -> bool:
        """Ended with a result the stages after it can read."""
        return self in (State.COMPLETED, State.CACHED)

    @classmethod
    def parse(cls, word: str | None) -> "State":
        """A stored state, also as older state indexes wrote it (MLflow's words)."""
        if not word:
            return cls.UNKNOWN
        return _MLFLOW_WORDS.get(word) or cls.__members__.get(word, cls.UNKNOWN)


ENDED = frozenset({State.COMPLETED, State.CACHED, State.FAILED, State.CANCELLED, State.SKIPPED})

# What MLflow shows for each state (its runs know SCHEDULED, RUNNING, FINISHED, FAILED, KILLED).
MLFLOW_STATUS = {
    State.PENDING: "SCHEDULED", State.QUEUED: "SCHEDULED", State.UNKNOWN: "SCHEDULED", State.RUNNING: "RUNNING",
    State.COMPLETED: "FINISHED", State.CACHED: "FINISHED", State.FAILED: "FAILED", State.CANCELLED: "KILLED",
    State.SKIPPED: "KILLED",
}
_MLFLOW_WORDS = {"SCHEDULED": State.QUEUED, "FINISHED": State.COMPLETED, "KILLED": State.CANCELLED}


def overall(states: list[State]) -> State | None:
    """A run's state from its stages' (or an ablation's from its variants'): None while one is still active."""
    if not states or not all(s.ended for s in states):
        return None
    if all(s.ok for s in states):
        return State.COMPLETED
    return State.FAILED if State.FAILED in states else State.CANCELLED
