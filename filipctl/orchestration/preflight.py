"""Before anything is written: the recipe made to mean the same wherever its jobs run, and every check that
can fail without leaving anything behind (the tracking store answers, the run folders can be made, the
scheduler accepts each job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from filipctl import tracking
from filipctl.backends.base import Backend, JobHandle, JobRequest
from filipctl.errors import FilipctlError
from filipctl.orchestration.graph import Node
from filipctl.schema import Recipe


def _absolute(url: str) -> str:
    """A local path (or pattern) made absolute, ~ expanded; URLs with a scheme stay as they are."""
    if "://" in url:
        return url
    path = Path(url).expanduser()
    return str(path) if path.is_absolute() else str(path.resolve())


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
    sets = [d.model_copy(update={"url": _absolute(d.url)}) for d in recipe.eval.datasets]
    recipe = recipe.model_copy(update={"data": data.model_copy(update=update),
                                       "eval": recipe.eval.model_copy(update={"datasets": sets}),
                                       "output_dir": str(Path(recipe.output_dir).resolve())})
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
    """The folder can be made: its nearest existing ancestor is a folder this process may write to."""
    import os

    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FilipctlError(f"cannot create the run folder {folder}: {parent} is not a writable folder; "
                            "set output_dir to one")


def request_for_planning(node: Node, backend: Backend) -> JobRequest:
    """The job request of `node` before its dependencies have jobs (validation, --dry-run): each job it would
    wait for stands in as a placeholder handle."""
    after = ()
    if backend.native_dependencies:
        after = tuple(JobHandle(backend, f"<{d} job id>@", f"<{d} job id>", node.run_dir.root) for d in node.stage.after)
    return JobRequest(node.stage, node.run_dir, after=after)


def preflight(recipe: Recipe, backend: Backend, to_run: list[Node]) -> str:
    """Every check that can fail without leaving anything behind -> the tracking URI."""
    uri = tracking.resolve_uri(recipe.tracking.uri)
    tracking.check_store(uri, recipe.tracking.timeout_s, must_exist=False)
    _check_writable(Path(recipe.output_dir))
    # Ask the scheduler first: a request it can never satisfy fails here, with nothing queued or tracked.
    for node in to_run:
        backend.validate(request_for_planning(node, backend))
    return uri
