"""Run a recipe's stages through a backend, tracked in MLflow, with progress on the console.

    prepare   align the recipe with its cluster, ask the scheduler whether every job could run
    track     write the run folder and recipe.json, open the MLflow parent and one child per stage
    submit    start (or queue, with native dependencies) each stage's job
    follow    wait for each job, drawing its progress events; record how it ended
    abandon   on failure or Ctrl-C, cancel what has not finished and record it
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from filipctl import provenance, tracking
from filipctl.backends import Backend, JobRequest, JobState, get_backend
from filipctl.contract import TAG_CLUSTER, TAG_FINGERPRINT, TAG_JOB, TAG_RECIPE_PATH, TAG_WORKDIR, RunDir, job_env
from filipctl.errors import FilipctlError
from filipctl.recipes import recipe_fingerprint, recipe_to_dict
from filipctl.schema import Recipe
from filipctl.stages import Stage, plan

POLL_S = 0.5


class StageFailed(FilipctlError):
    pass


@dataclass
class PipelineResult:
    parent_run_id: str
    tracking_uri: str
    workdir: Path
    metrics: dict[str, dict[str, float]]
    duration_s: float


def run_dir_for(recipe: Recipe) -> RunDir:
    """One folder per resolved recipe: rerunning the same recipe resumes from its checkpoints."""
    return RunDir(Path(recipe.output_dir).resolve() / f"{recipe.name}-{recipe_fingerprint(recipe)}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class _EventTail:
    """Reads the JSON lines a job appends to its events file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        # Keep a half-written last line for the next read.
        complete, _, _rest = chunk.rpartition("\n")
        if not complete:
            return []
        self.offset += len(complete) + 1
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _tail(text: str, n: int = 25) -> str:
    """What to quote of a failed job's log: its own `error:` lines when it said why, else the last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error: ")]
    return "\n".join("    " + ln for ln in (said[-5:] or lines[-n:]))


def _absolute(url: str) -> str:
    """A local path (or pattern) made absolute; URLs with a scheme stay as they are."""
    return url if "://" in url or Path(url).is_absolute() else str(Path(url).resolve())


def align_to_cluster(recipe: Recipe, console: Console) -> Recipe:
    """Make the recipe mean the same wherever its jobs run.

    Relative data paths become absolute (jobs may start in another directory: Ray workers do);
    on a cluster the profile decides the world size, and the recipe follows so that the
    global batch and the LR scaling are honest.
    """
    data = recipe.data
    update: dict[str, Any] = {"train": [s.model_copy(update={"url": _absolute(s.url)}) for s in data.train]}
    if data.eval is not None:
        update["eval"] = _absolute(data.eval)
    if data.filter is not None:
        update["filter"] = data.filter.model_copy(update={"output": _absolute(data.filter.output)})
    recipe = recipe.model_copy(update={"data": data.model_copy(update=update)})
    if recipe.cluster.backend == "local":
        return recipe
    profile = getattr(recipe.cluster, recipe.cluster.backend)
    world = profile.world_size
    if recipe.train.workers == world:
        return recipe
    console.print(f"note: train.workers {recipe.train.workers} -> {world} (cluster profile {recipe.cluster.name}); "
                  f"global batch {recipe.train.micro_batch_size * world}", highlight=False, markup=False)
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"workers": world})})


def _check_writable(folder: Path) -> None:
    """The run folder can be made: its nearest existing ancestor is a folder this process may write to."""
    import os

    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FilipctlError(f"cannot create the run folder {folder}: {parent} is not a writable folder; "
                            "set output_dir to one")


def _placeholder_ids(stages: list[Stage]) -> dict[str, str]:
    return {s.name: f"<{s.name} job id>" for s in stages}


def _requests(backend: Backend, stages: list[Stage], run_dir: RunDir) -> list[JobRequest]:
    """Each stage's request with placeholder dependencies: what --dry-run shows and the scheduler is asked."""
    ids = _placeholder_ids(stages)
    return [JobRequest(s, run_dir, after=tuple(ids[d] for d in s.after) if backend.native_dependencies else ())
            for s in stages]


def dry_run(recipe: Recipe, console: Console) -> None:
    """Print the plan and what each stage would submit; submit and write nothing."""
    recipe = align_to_cluster(recipe, console)
    backend = get_backend(recipe.cluster.backend, recipe.cluster)
    run_dir = run_dir_for(recipe)
    stages = plan(recipe)
    console.print(f"dry run: {recipe.name} on {backend.name} (profile {recipe.cluster.name}), workdir {run_dir.root}, "
                  f"global batch {recipe.train.global_batch}, nothing submitted", highlight=False, markup=False)
    for i, request in enumerate(_requests(backend, stages, run_dir), 1):
        stage = request.stage
        after = f" after {', '.join(stage.after)} succeeds" if stage.after else ""
        console.print(f"\n[bold]# stage {i}/{len(stages)}: {stage.name}[/] ({stage.module}){after}", highlight=False)
        console.print(backend.describe(request), highlight=False, markup=False, soft_wrap=True)


@dataclass
class PipelineRun:
    """One `filipctl run`: its recipe, backend, MLflow runs and the jobs submitted so far."""

    recipe: Recipe
    recipe_path: str
    console: Console
    backend: Backend = field(init=False)
    run_dir: RunDir = field(init=False)
    stages: list[Stage] = field(init=False)
    tracker: tracking.Tracker | None = None
    parent: str = ""
    children: dict[str, str] = field(default_factory=dict)
    submitted: dict[str, str] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.recipe = align_to_cluster(self.recipe, self.console)
        self.backend = get_backend(self.recipe.cluster.backend, self.recipe.cluster)
        self.run_dir = run_dir_for(self.recipe)
        self.stages = plan(self.recipe)

    # -- before anything is written ---------------------------------------------------------------

    def preflight(self) -> str:
        """Every check that can fail without leaving anything behind -> the tracking URI."""
        uri = tracking.resolve_uri(self.recipe.tracking.uri)
        tracking.check_store(uri, self.recipe.tracking.timeout_s, must_exist=False)
        _check_writable(self.run_dir.root)
        # Ask the scheduler first: a request it can never satisfy fails here, with nothing queued or tracked.
        for request in _requests(self.backend, self.stages, self.run_dir):
            self.backend.validate(request)
        return uri

    # -- the run folder and MLflow ----------------------------------------------------------------

    def track(self, uri: str, fresh: bool) -> None:
        recipe, run_dir = self.recipe, self.run_dir
        try:
            if fresh and run_dir.root.exists():
                shutil.rmtree(run_dir.root)
            run_dir.logs.mkdir(parents=True, exist_ok=True)
            _write_atomic(run_dir.recipe, json.dumps(recipe_to_dict(recipe), indent=1))
        except OSError as exc:
            raise FilipctlError(f"cannot write the run folder {run_dir.root}: {exc.strerror or exc}; "
                                "set output_dir to a writable folder") from None
        self.tracker = tracking.Tracker(uri, recipe.tracking.experiment)
        git = provenance.git_state()
        self.parent = self.tracker.start_pipeline(
            name=f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}", recipe=recipe_to_dict(recipe),
            backend=self.backend.name, description=recipe.description,
            tags={**{f"filipctl.{k}": v for k, v in git.items()}, "mlflow.source.git.commit": git["git_commit"],
                  TAG_RECIPE_PATH: self.recipe_path, TAG_WORKDIR: str(run_dir.root),
                  TAG_FINGERPRINT: recipe_fingerprint(recipe), TAG_CLUSTER: recipe.cluster.name},
            recipe_yaml=yaml.safe_dump(tracking.redact(recipe_to_dict(recipe)), sort_keys=False),
            versions=provenance.package_versions(),
        )
        self.console.print(f"run [bold]{escape(recipe.name)}[/] on [bold]{self.backend.name}[/]  "
                           f"workdir {escape(str(run_dir.root))}  mlflow run {self.parent}", highlight=False)
        if git["git_dirty"] == "true":
            self.console.print("[yellow]note:[/] the source tree has uncommitted changes (tagged filipctl.git_dirty=true)")
        self.children = {s.name: self.tracker.start_stage(self.parent, s.name, recipe.name, self.backend.name,
                                                          s.key_metric) for s in self.stages}

    # -- jobs -------------------------------------------------------------------------------------

    def submit(self, stage: Stage) -> None:
        events = self.run_dir.events(stage.name)
        events.unlink(missing_ok=True)
        after = tuple(self.submitted[d] for d in stage.after) if self.backend.native_dependencies else ()
        request = JobRequest(stage, self.run_dir, after=after,
                             env=job_env(self.tracker.uri, self.children[stage.name], events))
        self.submitted[stage.name] = self.backend.submit(request)
        self.tracker.tag(self.children[stage.name], TAG_JOB, self.submitted[stage.name])

    def queue_all(self) -> None:
        """A scheduler holds the afterok chain: queue every stage now."""
        try:
            for stage in self.stages:
                self.submit(stage)
        except FilipctlError:
            self.abandon("FAILED")
            raise
        self.console.print("queued: " + ", ".join(f"{n} = job {j.split('@')[0]}" for n, j in self.submitted.items()),
                           highlight=False)

    def wait(self, stage: Stage) -> JobState:
        """Poll the stage's job until it ends, drawing its progress; MLflow says RUNNING once it runs."""
        job_id, child = self.submitted[stage.name], self.children[stage.name]
        events = _EventTail(self.run_dir.events(stage.name))
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        console = self.console
        seen_running = False
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            task = progress.add_task(stage.name, total=None, note="starting")
            while True:
                for ev in events.read():
                    if not console.is_terminal:
                        console.print(f"  [{stage.name}] {ev['message']}", highlight=False, markup=False, soft_wrap=True)
                    progress.update(task, total=ev.get("total", progress.tasks[0].total),
                                    completed=ev.get("done", progress.tasks[0].completed), note=ev["message"][-60:])
                state = self.backend.status(job_id)
                if state is JobState.RUNNING and not seen_running:
                    self.tracker.running(child)
                    seen_running = True
                if state.done:
                    progress.update(task, note=state.value.lower())
                    return state
                time.sleep(POLL_S)

    def follow(self, stage: Stage) -> dict[str, float]:
        """Wait for one stage; its metrics when it completed, StageFailed (after abandoning the rest) if not."""
        if stage.name not in self.submitted:
            self.submit(stage)
        job_id, child = self.submitted[stage.name], self.children[stage.name]
        state = self.wait(stage)
        log = self.backend.logs(job_id)
        self.tracker.log_text(child, log, f"logs/{stage.name}.log")
        self.finished.add(stage.name)
        if state is not JobState.COMPLETED:
            self.tracker.end(child, "KILLED" if state is JobState.CANCELLED else "FAILED")
            left = self.abandon("KILLED")
            what = "cancelled" if self.backend.native_dependencies else "not run"
            raise StageFailed(f"stage {stage.name} {state.value.lower()}; {what}: {', '.join(left) or 'nothing'}. "
                              f"Last lines of its log:\n{_tail(log)}")
        self.tracker.end(child, "FINISHED")
        return self.tracker.metrics(child)

    def abandon(self, status: str) -> list[str]:
        """Cancel every stage that has not finished; end its MLflow run and the parent's; return their names."""
        left = [s.name for s in self.stages if s.name not in self.finished]
        for name in left:
            if name in self.submitted:
                self.backend.cancel(self.submitted[name])
            self.tracker.end(self.children[name], status)
        self.tracker.end(self.parent, "KILLED" if status == "KILLED" else "FAILED")
        return left


def run_pipeline(recipe: Recipe, recipe_path: str, console: Console, fresh: bool = False,
                 detach: bool = False) -> PipelineResult:
    t0 = time.time()
    run = PipelineRun(recipe, recipe_path, console)
    uri = run.preflight()
    run.track(uri, fresh)
    metrics: dict[str, dict[str, float]] = {}
    try:
        if run.backend.native_dependencies:
            run.queue_all()
            if detach:
                console.print(f"detached. Follow with: filipctl status   filipctl logs {run.parent[:8]}   "
                              f"filipctl cancel {run.parent[:8]}", highlight=False)
                return PipelineResult(run.parent, uri, run.run_dir.root, {}, time.time() - t0)
        for stage in run.stages:
            metrics[stage.name] = run.follow(stage)
    except KeyboardInterrupt:
        left = run.abandon("KILLED")
        raise StageFailed(f"interrupted: cancelled {', '.join(left)}; a rerun resumes from the latest checkpoint")
    run.tracker.end(run.parent, "FINISHED")
    return PipelineResult(run.parent, uri, run.run_dir.root, metrics, time.time() - t0)
