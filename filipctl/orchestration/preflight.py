"""Before anything is written: the recipe made to mean the same wherever its jobs run, and every check that
can fail without leaving anything behind (the tracking store answers, what the jobs write is writable: the run
folders, the checkpoint store and the build cache of DeepSpeed's C++ op, the scheduler accepts each job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from filipctl import tracking
from filipctl.backends.base import Backend, JobHandle, JobRequest
from filipctl.errors import CannotRun, FilipctlError
from filipctl.orchestration.graph import Node
from filipctl.orchestration.shared_storage import check_shared_storage
from filipctl.schema import Recipe
from jobs.train.batch_layout import LayoutError, layout_for


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
    train, name = recipe.train, recipe.cluster.name
    # Every size the job may get (a Slurm node range, a Ray worker range) must split the global batch: refused here,
    # not when a requeued job lands on a count that does not.
    sizes = profile.world_sizes
    for world in sizes:
        try:
            layout_for(train.global_batch, train.micro_batch_size, world)
        except LayoutError as exc:
            may = f"may run {sizes[0]}-{sizes[-1]} workers, and {world}" if len(sizes) > 1 else f"runs {world} workers"
            raise CannotRun(f"cluster profile {name} {may}: {exc}") from None
    world = profile.world_size
    if train.workers == world:
        return recipe
    layout = layout_for(train.global_batch, train.micro_batch_size, world)
    console.print(f"note: train.workers {train.workers} -> {world} (cluster profile {name}); global batch "
                  f"{train.global_batch} = {layout.describe()}" + (f" at {world}, the most the profile asks for"
                                                                   if len(sizes) > 1 else ""),
                  highlight=False, markup=False)
    return recipe.model_copy(update={"train": train.model_copy(update={"workers": world})})


def _unwritable(folder: Path) -> str | None:
    """Why no file can be written in `folder` (while it does not exist: in the nearest existing folder above it,
    where it would be made), or None when one can. A real probe (a temporary file made and removed), because
    os.access says yes to root on a read-only mount."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".filipctl-write-probe-"):
            pass
    except OSError as exc:
        return f"{exc.strerror or type(exc).__name__}: {existing}"
    return None


def _check_writable(folder: Path) -> None:
    """The run folder can be made and written."""
    why = _unwritable(folder)
    if why:
        raise FilipctlError(f"cannot create the run folder {folder} ({why}); set output_dir to a writable folder")


def _check_checkpoint_stores(recipe: Recipe, to_run: list[Node]) -> None:
    """Where the pretraining to run will write its checkpoints: its stage folder's checkpoints (local, Slurm), and
    for a private Ray on this machine the local storage_path."""
    for node in to_run:
        if node.stage.name != "pretrain":
            continue
        folder = node.run_dir.checkpoints
        why = _unwritable(folder)
        if why:
            raise FilipctlError(f"cannot write the checkpoints of {node.name} to {folder} ({why}); make it "
                                "writable or set output_dir to a writable folder")
        ray = node.recipe.cluster.ray
        if node.recipe.cluster.backend == "ray" and ray.address == "local" and "://" not in ray.storage_path:
            storage = Path(ray.storage_path).expanduser().resolve()
            why = _unwritable(storage)
            if why:
                raise FilipctlError(f"cannot write Ray Train's checkpoints to cluster.ray.storage_path {storage} "
                                    f"({why}); set it to a writable folder or to s3://bucket/prefix")


def deepspeed_shm_op_prebuilt() -> bool:
    """Whether the installed deepspeed holds its CPU shared-memory collective op prebuilt (scripts/env.sh builds
    it so). Read from deepspeed's install record without importing deepspeed (that costs seconds and torch)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return False
    record = Path(next(iter(spec.submodule_search_locations))) / "git_version_info_installed.py"
    values: dict[str, Any] = {}
    try:
        tree = ast.parse(record.read_text())
    except (OSError, SyntaxError):
        return False
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                continue
    ops = values.get("installed_ops")
    # deepspeed loads a prebuilt op only when it was built for the accelerator the workers use (cpu here).
    return isinstance(ops, dict) and bool(ops.get("deepspeed_shm_comm")) and values.get("accelerator_name") == "cpu"


def torch_extensions_dir() -> Path:
    """Where torch builds JIT-compiled C++ ops (torch.utils.cpp_extension's rule, without importing torch)."""
    import os

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "torch_extensions"


def _check_build_cache(recipe: Recipe, to_run: list[Node]) -> None:
    """CPU pretraining workers compile DeepSpeed's shm op into the torch extensions folder at start unless the
    environment has it prebuilt; there a read-only HOME would fail the job minutes in, after the data stage."""
    if not any(n.stage.name == "pretrain" for n in to_run):
        return
    if recipe.cluster.backend == "ray" and recipe.cluster.ray.use_gpu:
        return  # GPU workers do not use the CPU op
    if deepspeed_shm_op_prebuilt():
        return
    folder = torch_extensions_dir()
    why = _unwritable(folder)
    if why:
        raise FilipctlError(f"cannot write the torch extensions build cache {folder} ({why}): pretraining workers "
                            "compile DeepSpeed's CPU shm op there at start; set XDG_CACHE_HOME (or "
                            "TORCH_EXTENSIONS_DIR) to a writable folder, or rebuild the environment with "
                            "scripts/env.sh, which installs the op prebuilt")


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
    # What the jobs will write, before anything is: a job must not fail on it minutes (or a queue wait) later.
    _check_writable(Path(recipe.output_dir))
    _check_checkpoint_stores(recipe, to_run)
    _check_build_cache(recipe, to_run)
    # Ask the scheduler first: a request it can never satisfy fails here, with nothing queued or tracked.
    for node in to_run:
        backend.validate(request_for_planning(node, backend))
    # Several nodes: what one writes, the others must read (checkpoints after a lost node above all).
    check_shared_storage(recipe, [n.run_dir.checkpoints for n in to_run if n.stage.name == "pretrain"])
    return uri
