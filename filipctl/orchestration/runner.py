"""The runner: applies the executor's decisions to a backend and feeds the executor what the jobs do.

It is where the effects of running a graph happen, and the only place: jobs are submitted and
cancelled here, their states are polled here (one batched query per interval for every job that
is active), and a completed stage's result is read from its stage folder (result.json) and
recorded there (done.json). Whoever else wants to know (the MLflow sink, the progress view)
subscribes and is told each transition with what it carries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from filipctl.backends.base import Backend, JobHandle, JobRequest
from filipctl.contract import clear_error_records, read_result
from filipctl.errors import FilipctlError
from filipctl.orchestration.executor import Cancel, Decision, Executor, Submit
from filipctl.orchestration.graph import Graph, Node
from filipctl.orchestration.stage_folders import record_done
from filipctl.states import State

POLL_S = 0.5


@dataclass
class Transition:
    """One change of a stage's state, with what a subscriber needs to record or draw it."""

    node: Node
    old: State
    new: State
    handle: JobHandle | None
    metrics: dict[str, float] = field(default_factory=dict)  # its result's (COMPLETED) or done record's (CACHED)
    why: str = ""  # for FAILED: what the runner saw beyond the job's own log (no result.json...)


class Subscriber(Protocol):
    def changed(self, t: Transition) -> None: ...


class Runner:
    def __init__(self, graph: Graph, backend: Backend, executor: Executor,
                 env_for: Callable[[Node], dict[str, str]] = lambda node: {}, poll_s: float = POLL_S) -> None:
        self.graph = graph
        self.backend = backend
        self.executor = executor
        self.env_for = env_for  # the job's environment: where it reports (tracking sink), its events file
        self.poll_s = poll_s
        self.handles: dict[str, JobHandle] = {}
        self.metrics: dict[str, dict[str, float]] = {}  # key -> what its result or done record holds
        self.why: dict[str, str] = {}
        self.subscribers: list[Subscriber] = []
        self.ticks: list[Callable[[], None]] = []  # called once per poll interval (progress drawing)
        executor.subscribe(self._changed)

    # -- running ----------------------------------------------------------------------------------------

    def run(self, detach: bool = False) -> bool:
        """Run the graph to its end -> False when detached (everything queued on a scheduler, nothing followed).

        Ctrl-C (KeyboardInterrupt) and a refused submission cancel what was submitted, then propagate.
        """
        try:
            self._apply(self.executor.start())
            if detach:
                return False
            while not self.executor.finished:
                self.poll()
                for tick in self.ticks:
                    tick()
                if not self.executor.finished:
                    time.sleep(self.poll_s)
            for tick in self.ticks:
                tick()
        except (KeyboardInterrupt, FilipctlError):
            self._apply(self.executor.interrupt())
            raise
        return True

    def poll(self) -> None:
        """One batched query of every active job; each answer goes to the executor."""
        keys = self.executor.active
        if not keys:
            return
        states = self.backend.poll([self.handles[k] for k in keys])
        for key in keys:
            state = states.get(self.handles[key].ref, State.UNKNOWN)
            if state is State.COMPLETED and read_result(self.graph.nodes[key].run_dir) is None:
                # Exit status 0 without a result: whatever it did, nothing after it can read it.
                state = State.FAILED
                self.why[key] = f"the job exited without writing {self.graph.nodes[key].run_dir.result}"
            self._apply(self.executor.observe(key, state))

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Submit):
                node = self.graph.nodes[d.key]
                node.run_dir.events(node.stage.name).unlink(missing_ok=True)
                node.run_dir.result.unlink(missing_ok=True)
                clear_error_records(node.run_dir)  # an earlier run's failures are not this one's
                request = JobRequest(node.stage, node.run_dir, env=self.env_for(node),
                                     after=tuple(self.handles[k] for k in d.after))
                self.handles[d.key] = self.backend.submit(request)
                self._tell(node, State.PENDING, State.QUEUED)  # now with its handle
            elif isinstance(d, Cancel) and d.key in self.handles:
                self.handles[d.key].cancel()

    # -- recording ------------------------------------------------------------------------------------------

    def _changed(self, key: str, old: State, new: State) -> None:
        node = self.graph.nodes[key]
        if new is State.QUEUED:
            return  # told once the backend took it (_apply), with its job handle
        if new is State.CACHED:
            record = node.done() or {}
            self.metrics[key] = record.get("metrics", {})
        elif new is State.COMPLETED:
            self._record_done(node)
        self._tell(node, old, new)

    def _record_done(self, node: Node) -> None:
        self.metrics[node.key] = record_done(node.run_dir, node.key, node.stage.name) or {}

    def _tell(self, node: Node, old: State, new: State) -> None:
        t = Transition(node, old, new, self.handles.get(node.key), self.metrics.get(node.key, {}),
                       self.why.get(node.key, ""))
        for s in self.subscribers:
            s.changed(t)
