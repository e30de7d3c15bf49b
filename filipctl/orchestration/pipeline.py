"""A graph run: `filipctl run` (the graph of one variant), `filipctl ablate` (of several), `filipctl eval` (one stage).

It wires the pieces, each in its own file, and does nothing of theirs:

    preflight.py      the recipe aligned to the cluster; the store, the folders and the scheduler checked
    graph.py          the stages of every variant, keyed by what they read (stage_keys.py)
    executor.py       decides: what is cached, what to submit when, what to cancel or skip
    runner.py         does: submits, polls the jobs, reads result.json, writes done.json
    tracking/sink.py  records every transition in MLflow (and the state index)
    reports/progress.py draws it
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from filipctl.backends import Backend, get_backend
from filipctl.contract import describe_error, first_error
from filipctl.errors import FilipctlError, UsageProblem
from filipctl.orchestration import stage_folders
from filipctl.orchestration.executor import Executor, Limits, Step
from filipctl.orchestration.graph import Graph, build_graph
from filipctl.orchestration.preflight import align_to_cluster, preflight
from filipctl.orchestration.runner import Runner, Transition
from filipctl.orchestration.stage_lock import StageLocks, progress as stage_progress
from filipctl.schema import Recipe
from filipctl.states import State
from filipctl.tracking.forwarder import Forwarder, outboxes, remove_sent


FOLLOW_POLL_S = 1.0  # how often a command following another's stage looks whether it is free


class RunFailed(FilipctlError):
    """A graph run that did not complete: a stage failed, or it was interrupted."""


@dataclass
class PipelineResult:
    parent_run_id: str
    tracking_uri: str
    workdir: Path
    metrics: dict[str, dict[str, float]]
    duration_s: float
    experiment_id: str = ""  # for the UI link (tracking.ui_command); empty when the store did not answer


def _tail(text: str, n: int = 25) -> str:
    """What to quote of a failed job's log: its own `error:` lines when it said why, else the last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error: ")]
    return "\n".join("    " + ln for ln in (said[-5:] or lines[-n:]))


class GraphRun:
    """One `filipctl run`, `ablate` or `eval`: its graph, its backend, and after `run` how each stage ended."""

    def __init__(self, variants: dict[str, Recipe], console: Console, force: bool = False,
                 graph: Graph | None = None, label: str = "", tags: dict[str, str] | None = None,
                 backend: Backend | None = None) -> None:
        self.console = console
        self.recipes = {v: align_to_cluster(r, console) for v, r in variants.items()}
        self.first = next(iter(self.recipes.values()))
        self.backend = backend or get_backend(self.first.cluster.backend, self.first.cluster)
        self.graph: Graph = graph or build_graph(self.recipes, Path(self.first.output_dir))
        self.label = label  # in the pipeline run's name: "eval" for `filipctl eval`
        self.tags = tags or {}
        self.force = force
        self.locks = StageLocks()  # of the stages this command runs (stage_lock.py)
        self._plan()
        self.sink = None  # tracking.sink.MlflowSink, once `run` opened the MLflow runs
        self.top = ""

    def _plan(self) -> None:
        """What is done (reused) and what to run, from the stage folders as they are now."""
        stages, processes = self.backend.capacity()
        self.executor = Executor({k: Step(k, tuple(n.deps.values()), n.stage.processes) for k, n in self.graph.nodes.items()},
                                 stage_folders.done_records(self.graph), force=self.force,
                                 native_dependencies=self.backend.native_dependencies,
                                 limits=Limits(stages, processes))
        self.cached = set(self.executor.reusable())
        self.runner = Runner(self.graph, self.backend, self.executor)

    @property
    def states(self) -> dict[str, State]:
        return self.executor.state

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return self.runner.metrics

    @property
    def tracker(self):
        return self.sink.tracker

    def to_run(self) -> list:
        return [n for n in self.graph.nodes.values() if n.key not in self.cached]

    def preflight(self) -> str:
        return preflight(self.first, self.backend, self.to_run())

    def describe(self) -> None:
        from filipctl.reports.plan import print_plan

        print_plan(self.console, self.graph, self.backend, self.first.cluster.name, self.cached)

    def run(self, uri: str, recipe_path: str, detach: bool, ablation: dict[str, Any] | None = None) -> bool:
        """Track and execute -> False when detached. Ctrl-C cancels what has not finished.

        Only while holding the locks of the stages to run: a stage that another command runs is followed, not run
        a second time (`own_stages`)."""
        self.own_stages()
        try:
            return self._run_owned(uri, recipe_path, detach, ablation)
        finally:
            self.locks.release()

    def own_stages(self) -> None:
        """Lock the folders of the stages to run before anything is written in them. A stage held by another
        command, or run by a job whose command is gone, is followed: wait until it is free, then plan again from
        what it left there (done -> reused, else resumed from its checkpoint)."""
        told: set[tuple[Path, int]] = set()
        while True:
            nodes = {n.run_dir.root: n for n in self.to_run()}
            busy = self.locks.take({folder: n.stage.name for folder, n in nodes.items()})
            if not busy:
                return
            self.locks.release()  # none held while waiting: two commands never wait for each other
            for folder, owner in busy.items():
                if (folder, owner.pid) not in told:
                    told.add((folder, owner.pid))
                    stage = nodes[folder].stage.name
                    now = stage_progress(nodes[folder].run_dir, stage)
                    self.console.print(f"stage {stage} is being run by {owner.describe()}; following it"
                                       + (f" (last: {now})" if now else ""), highlight=False, markup=False)
            time.sleep(FOLLOW_POLL_S)
            self._plan()

    def _run_owned(self, uri: str, recipe_path: str, detach: bool, ablation: dict[str, Any] | None = None) -> bool:
        stages, _ = self.backend.capacity()
        if detach and stages is not None and stages < len(self.to_run()):
            # Detached, nobody would be there to submit the rest once room frees up.
            raise UsageProblem(f"--detach queues the whole graph at once, but cluster.{self.backend.name}.max_parallel "
                               f"is {stages} for {len(self.to_run())} stages to run; unset it or do not detach")
        self.open_runs(uri, recipe_path, ablation)
        label = "ablation" if ablation is not None else "run"
        self.console.print(f"{label} [bold]{escape(self.first.name)}[/] on [bold]{self.backend.name}[/]: "
                           f"{len(self.graph.nodes)} stages, {len(self.to_run())} to run  mlflow run {self.top}",
                           highlight=False)
        for note in self.sink.source_notes:
            self.console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        more = []
        if self.backend.native_dependencies:  # the whole graph goes to the scheduler at once: say which job is which
            more.append(_QueuedLine(self.console, len(self.to_run())))
        if self.sink.resumed:
            self.console.print(f"continuing the MLflow run of {', '.join(self.sink.resumed)} (one run per stage)",
                               highlight=False)
        return self.execute(detach, more)

    def open_runs(self, uri: str, recipe_path: str, ablation: dict[str, Any] | None = None) -> None:
        """The folders of the stages to run made ready, and the MLflow runs opened (`self.sink`, `self.top`)."""
        from filipctl.tracking.sink import MlflowSink
        from filipctl.tracking.writer import Tracker

        stage_folders.prepare(self.graph, self.to_run(), fresh=self.force)
        self.sink = MlflowSink(Tracker(uri, self.first.tracking.experiment), self.graph, self.backend.name)
        self.top = self.sink.open(self.recipes, recipe_path, self.label, self.tags, ablation,
                                  to_run={n.key for n in self.to_run()})

    def execute(self, detach: bool = False, subscribers: list | None = None) -> bool:
        """Run the graph whose MLflow runs are open (`self.sink`) -> False when detached. Here, or by the graph runner
        of a Ray job (graph_job.py), which gets the runs the submitting command opened."""
        from filipctl.reports.progress import ProgressView

        self.runner.env_for = self.sink.job_env
        view = ProgressView(self.console)
        self.runner.subscribers += [self.sink, view, *(subscribers or [])]
        self.runner.ticks.append(view.tick)
        # Jobs append to their spools and the sink to its outbox; this thread sends both to MLflow when it answers.
        forwarder = Forwarder(self.tracker.client, self.sink.spools).start()
        try:
            try:
                with view:
                    followed = self.runner.run(detach)
            except KeyboardInterrupt:
                self.sink.close(self.states, self.metrics, interrupted=True)
                left = [self.graph.nodes[k].stage.name for k, s in self.states.items()
                        if s in (State.CANCELLED, State.SKIPPED)]
                raise RunFailed(f"interrupted: cancelled {', '.join(left) or 'nothing'}; a rerun resumes from the "
                                "latest checkpoint and reuses the stages that finished") from None
            except FilipctlError:
                self.sink.close(self.states, self.metrics)
                raise
            if not followed:
                self.console.print(f"detached. Follow with: filipctl status   filipctl logs {self.top[:8]}   "
                                   f"filipctl cancel {self.top[:8]}", highlight=False)
                return False
            self.sink.close(self.states, self.metrics)
            return True
        finally:
            self._finish_tracking(forwarder)

    def _finish_tracking(self, forwarder: Forwarder) -> None:
        """Send what the store has not taken yet, for at most tracking.drain_s; say what is left and how to send it."""
        self._tell_left(forwarder.stop(self.first.tracking.drain_s), forwarder.last_error)

    def flush_tracking(self) -> None:
        """After the graph: send what was recorded since (an ablation's table), for at most tracking.drain_s."""
        self._tell_left(self.tracker.flush(self.first.tracking.drain_s), "")

    def _tell_left(self, left: int, error: str) -> None:
        if not left:
            remove_sent(outboxes(self.tracker.outbox.path.parent))
            return
        why = f" ({error})" if error else ""
        self.console.print(f"[yellow]note:[/] the MLflow store has not taken {left} tracking records yet"
                           f"{escape(why)}; nothing is lost: they wait in the stage folders and "
                           "`filipctl sync` (or `filipctl status`) sends them", highlight=False, soft_wrap=True)

    def failure(self) -> RunFailed | None:
        """The first failed stage, as the one-line story a person reads (with its log's own words)."""
        for key, state in self.states.items():
            if state not in (State.FAILED, State.CANCELLED):
                continue
            node = self.graph.nodes[key]
            dependents = [self.graph.nodes[d].stage.name for d in self.executor.downstream(key)]
            what = "cancelled" if self.backend.native_dependencies else "not run"
            verb = "failed" if state is State.FAILED else "cancelled"
            handle = self.runner.handles.get(key)
            why = self.runner.why.get(key, "")
            head = f"stage {node.stage.name} {verb}{': ' + why if why else ''}; {what}: {', '.join(dependents) or 'nothing'}."
            record = first_error(node.run_dir) if state is State.FAILED else None
            if record is not None:  # the first failing worker's own exception, not the launcher's summary of it
                cause = describe_error(record, with_rank=node.stage.distributed)
                log_file = node.run_dir.log(node.stage.name)
                where = log_file if log_file.is_file() else node.run_dir.slurm if node.run_dir.slurm.is_dir() else None
                more = "" if record.get("job_error") or where is None else f" Its traceback is in {where}"
                return RunFailed(f"{head} Cause: {cause}{more}")
            log = handle.logs() if handle else ""
            return RunFailed(f"{head} Last lines of its log:\n{_tail(log)}")
        return None


class _QueuedLine:
    """On a scheduler: one line naming each stage's job once every stage to run was queued."""

    def __init__(self, console: Console, expected: int) -> None:
        self.console, self.expected = console, expected
        self.jobs: list[str] = []

    def changed(self, t: Transition) -> None:
        if t.new is State.QUEUED and t.handle is not None:
            self.jobs.append(f"{t.node.stage.name} = job {t.handle.label}")
            if len(self.jobs) == self.expected:
                self.console.print("queued: " + ", ".join(self.jobs), highlight=False)


def run_pipeline(recipe: Recipe, recipe_path: str, console: Console, fresh: bool = False,
                 detach: bool = False) -> PipelineResult:
    """`filipctl run`: the graph of one variant."""
    t0 = time.time()
    run = GraphRun({"": recipe}, console, force=fresh)
    uri = run.preflight()
    followed = run.run(uri, recipe_path, detach)
    keys = run.graph.variants[""]
    workdir = run.graph.nodes[keys["pretrain"]].run_dir.root
    experiment = str(run.tracker.experiment_id or "")
    if not followed:
        return PipelineResult(run.top, uri, workdir, {}, time.time() - t0, experiment)
    failed = run.failure()
    if failed:
        raise failed
    metrics = {stage: run.metrics.get(key, {}) for stage, key in keys.items()}
    return PipelineResult(run.top, uri, workdir, metrics, time.time() - t0, experiment)


def dry_run(recipe: Recipe, console: Console) -> None:
    """Print the graph and what each stage would submit; submit and write nothing."""
    GraphRun({"": recipe}, console).describe()
