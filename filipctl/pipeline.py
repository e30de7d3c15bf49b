"""Run a recipe's stages through a backend, tracked in MLflow, with progress on the console."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from filipctl import provenance, tracking
from filipctl.backends import Backend, JobRequest, JobState, get_backend
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


def workdir_for(recipe: Recipe) -> Path:
    """One folder per resolved recipe: rerunning the same recipe resumes from its checkpoints."""
    return Path(recipe.output_dir).resolve() / f"{recipe.name}-{recipe_fingerprint(recipe)}"


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


def _wait(backend: Backend, job_id: str, stage: Stage, events: _EventTail, console: Console) -> JobState:
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(stage.name, total=None, note="starting")
        while True:
            for ev in events.read():
                if not console.is_terminal:
                    console.print(f"  [{stage.name}] {ev['message']}", highlight=False, markup=False, soft_wrap=True)
                progress.update(task, total=ev.get("total", progress.tasks[0].total),
                                completed=ev.get("done", progress.tasks[0].completed), note=ev["message"][-60:])
            state = backend.status(job_id)
            if state.done:
                progress.update(task, note=state.value.lower())
                return state
            time.sleep(POLL_S)


def _tail(text: str, n: int = 25) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def align_to_cluster(recipe: Recipe, console: Console) -> Recipe:
    """Make the recipe mean the same wherever its jobs run.

    Relative data paths become absolute (jobs may start in another directory: Ray workers do);
    on a cluster the profile decides the world size, and the recipe follows so that the
    global batch and the LR scaling are honest.
    """
    if "://" not in recipe.data.url and not Path(recipe.data.url).is_absolute():
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"url": str(Path(recipe.data.url).resolve())})})
    if recipe.cluster.backend == "local":
        return recipe
    profile = getattr(recipe.cluster, recipe.cluster.backend)
    world = profile.world_size
    if recipe.train.workers == world:
        return recipe
    console.print(f"note: train.workers {recipe.train.workers} -> {world} (cluster profile {recipe.cluster.name}); "
                  f"global batch {recipe.train.micro_batch_size * world}", highlight=False)
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"workers": world})})


def _placeholder_ids(stages: list[Stage]) -> dict[str, str]:
    return {s.name: f"<{s.name} job id>" for s in stages}


def dry_run(recipe: Recipe, console: Console) -> None:
    """Print the plan and what each stage would submit; submit and write nothing."""
    recipe = align_to_cluster(recipe, console)
    backend = get_backend(recipe.cluster.backend, recipe.cluster)
    workdir = workdir_for(recipe)
    stages = plan(recipe)
    ids = _placeholder_ids(stages)
    console.print(f"dry run: {recipe.name} on {backend.name} (profile {recipe.cluster.name}), workdir {workdir}, "
                  f"global batch {recipe.train.global_batch}, nothing submitted", highlight=False)
    for i, stage in enumerate(stages, 1):
        after = f" after {', '.join(stage.after)} succeeds" if stage.after else ""
        console.print(f"\n[bold]# stage {i}/{len(stages)}: {stage.name}[/] ({stage.module}){after}", highlight=False)
        request = JobRequest(stage, workdir / "recipe.json", workdir,
                             after=tuple(ids[d] for d in stage.after) if backend.native_dependencies else ())
        console.print(backend.describe(request), highlight=False, markup=False, soft_wrap=True)


def run_pipeline(recipe: Recipe, recipe_path: str, console: Console, fresh: bool = False,
                 detach: bool = False) -> PipelineResult:
    t0 = time.time()
    recipe = align_to_cluster(recipe, console)
    backend = get_backend(recipe.cluster.backend, recipe.cluster)
    workdir = workdir_for(recipe)
    stages = plan(recipe)
    recipe_file = workdir / "recipe.json"
    ids = _placeholder_ids(stages)
    # Ask the scheduler first: a request it can never satisfy fails here, with nothing queued or tracked.
    for stage in stages:
        backend.validate(JobRequest(stage, recipe_file, workdir, after=tuple(ids[d] for d in stage.after)
                                    if backend.native_dependencies else ()))

    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    _write_atomic(recipe_file, json.dumps(recipe_to_dict(recipe), indent=1))
    uri = tracking.resolve_uri(recipe.tracking.uri)
    tracker = tracking.Tracker(uri, recipe.tracking.experiment)
    git = provenance.git_state()
    parent = tracker.start_pipeline(
        name=f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}", recipe=recipe_to_dict(recipe),
        recipe_path=recipe_path, backend=backend.name,
        tags={**{f"filipctl.{k}": v for k, v in git.items()}, "mlflow.source.git.commit": git["git_commit"],
              tracking.TAG_WORKDIR: str(workdir), "filipctl.fingerprint": recipe_fingerprint(recipe),
              "filipctl.cluster": recipe.cluster.name},
        recipe_yaml=yaml.safe_dump(tracking.redact(recipe_to_dict(recipe)), sort_keys=False),
        versions=provenance.package_versions(),
    )
    console.print(f"run [bold]{recipe.name}[/] on [bold]{backend.name}[/]  workdir {workdir}  "
                  f"mlflow run {parent}", highlight=False)
    if git["git_dirty"] == "true":
        console.print("[yellow]note:[/] the source tree has uncommitted changes (tagged filipctl.git_dirty=true)")

    children = {s.name: tracker.start_stage(parent, s.name, recipe.name, backend.name, s.key_metric) for s in stages}
    submitted: dict[str, str] = {}
    finished: set[str] = set()

    def events_file(stage: Stage) -> Path:
        return workdir / "logs" / f"{stage.name}.events.jsonl"

    def submit(stage: Stage) -> None:
        events_file(stage).unlink(missing_ok=True)
        after = tuple(submitted[d] for d in stage.after) if backend.native_dependencies else ()
        request = JobRequest(stage, recipe_file, workdir, after=after, env={
            "MLFLOW_TRACKING_URI": uri, "FILIPCTL_MLFLOW_RUN_ID": children[stage.name],
            "FILIPCTL_EVENTS": str(events_file(stage)),
        })
        submitted[stage.name] = backend.submit(request)
        tracker.tag(children[stage.name], tracking.TAG_JOB, submitted[stage.name])

    def abandon(status: str) -> list[str]:
        """Cancel every stage that has not finished; end its MLflow run; return their names."""
        left = [s.name for s in stages if s.name not in finished]
        for name in left:
            if name in submitted:
                backend.cancel(submitted[name])
            tracker.end(children[name], status)
        tracker.end(parent, "KILLED" if status == "KILLED" else "FAILED")
        return left

    metrics: dict[str, dict[str, float]] = {}
    try:
        if backend.native_dependencies:
            try:
                for stage in stages:
                    submit(stage)
            except FilipctlError:
                abandon("FAILED")
                raise
            console.print("queued: " + ", ".join(f"{n} = job {j.split('@')[0]}" for n, j in submitted.items()),
                          highlight=False)
            if detach:
                console.print(f"detached. Follow with: filipctl status   filipctl logs {parent[:8]}   "
                              f"filipctl cancel {parent[:8]}", highlight=False)
                return PipelineResult(parent, uri, workdir, {}, time.time() - t0)
        for stage in stages:
            if stage.name not in submitted:
                submit(stage)
            job_id = submitted[stage.name]
            state = _wait(backend, job_id, stage, _EventTail(events_file(stage)), console)
            tracker.log_text(children[stage.name], backend.logs(job_id), f"logs/{stage.name}.log")
            if state is not JobState.COMPLETED:
                tracker.end(children[stage.name], "KILLED" if state is JobState.CANCELLED else "FAILED")
                finished.add(stage.name)
                left = abandon("KILLED")
                what = "cancelled" if backend.native_dependencies else "not run"
                raise StageFailed(
                    f"stage {stage.name} {state.value.lower()}; {what}: {', '.join(left) or 'nothing'}. "
                    f"Last lines of its log:\n{_tail(backend.logs(job_id))}"
                )
            finished.add(stage.name)
            tracker.end(children[stage.name], "FINISHED")
            metrics[stage.name] = tracker.metrics(children[stage.name])
    except KeyboardInterrupt:
        left = abandon("KILLED")
        raise StageFailed(f"interrupted: cancelled {', '.join(left)}; a rerun resumes from the latest checkpoint")
    tracker.end(parent, "FINISHED")
    return PipelineResult(parent, uri, workdir, metrics, time.time() - t0)
