"""Run a recipe's stages through a backend, tracked in MLflow, with progress on the console."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from filipctl import provenance, tracking
from filipctl.backends import Backend, JobRequest, JobState, get_backend
from filipctl.errors import FilipctlError
from filipctl.recipes import recipe_fingerprint, recipe_to_dict, recipe_to_yaml
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


def run_pipeline(recipe: Recipe, recipe_path: str, backend_name: str, console: Console,
                 fresh: bool = False) -> PipelineResult:
    t0 = time.time()
    backend = get_backend(backend_name)
    workdir = workdir_for(recipe)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    recipe_file = workdir / "recipe.json"
    _write_atomic(recipe_file, json.dumps(recipe_to_dict(recipe), indent=1))
    uri = tracking.resolve_uri(recipe.tracking.uri)
    tracker = tracking.Tracker(uri, recipe.tracking.experiment)
    git = provenance.git_state()
    parent = tracker.start_pipeline(
        name=f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}", recipe=recipe_to_dict(recipe),
        recipe_path=recipe_path, backend=backend.name,
        tags={**{f"filipctl.{k}": v for k, v in git.items()}, "mlflow.source.git.commit": git["git_commit"],
              tracking.TAG_WORKDIR: str(workdir), "filipctl.fingerprint": recipe_fingerprint(recipe)},
        recipe_yaml=recipe_to_yaml(recipe), versions=provenance.package_versions(),
    )
    console.print(f"run [bold]{recipe.name}[/] on [bold]{backend.name}[/]  workdir {workdir}  "
                  f"mlflow run {parent}", highlight=False)
    if git["git_dirty"] == "true":
        console.print("[yellow]note:[/] the source tree has uncommitted changes (tagged filipctl.git_dirty=true)")

    metrics: dict[str, dict[str, float]] = {}
    for stage in plan(recipe):
        child = tracker.start_stage(parent, stage.name, recipe.name, backend.name, stage.key_metric)
        events_file = workdir / "logs" / f"{stage.name}.events.jsonl"
        events_file.unlink(missing_ok=True)
        request = JobRequest(stage, recipe_file, workdir, env={
            "MLFLOW_TRACKING_URI": uri, "FILIPCTL_MLFLOW_RUN_ID": child, "FILIPCTL_EVENTS": str(events_file),
        })
        job_id = backend.submit(request)
        tracker.tag(child, tracking.TAG_JOB, job_id)
        try:
            state = _wait(backend, job_id, stage, _EventTail(events_file), console)
        except KeyboardInterrupt:
            backend.cancel(job_id)
            tracker.log_file(child, request.log_file, "logs")
            tracker.end(child, "KILLED")
            tracker.end(parent, "KILLED")
            raise StageFailed(f"interrupted: cancelled stage {stage.name}; a rerun resumes from the latest checkpoint")
        tracker.log_file(child, request.log_file, "logs")
        if state is not JobState.COMPLETED:
            tracker.end(child, "KILLED" if state is JobState.CANCELLED else "FAILED")
            tracker.end(parent, "FAILED")
            raise StageFailed(
                f"stage {stage.name} {state.value.lower()}; later stages not run. "
                f"Last lines of {request.log_file}:\n{_tail(backend.logs(job_id))}"
            )
        tracker.end(child, "FINISHED")
        metrics[stage.name] = tracker.metrics(child)
    tracker.end(parent, "FINISHED")
    return PipelineResult(parent, uri, workdir, metrics, time.time() - t0)

