"""`filipctl eval`: evaluate a finished run or a checkpoint without retraining, as a stage of its own.

The eval stage's key hashes the weights file's content, the data index it reads (for the held-out
split), the recipe's model and eval sections and the worker code: the same checkpoint evaluated
on the same sets again is found done and reused; another set, another checkpoint or a change to
the evaluation code is a new stage.

The weights' sha256 is taken once: a pretrain stage recorded it in its result.json; a model.pt from
elsewhere is hashed here, and the digest goes to the job in inputs.json (the job does not hash again).
Nothing here imports torch: the weights are checked by reading their tensors' shapes from the
checkpoint's pickle, with a reader that builds nothing but shapes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from filipctl.contract import TAG_EVALUATED, TAG_KIND, TAG_WORKDIR, RunDir, file_sha256, read_result
from filipctl.errors import FilipctlError
from filipctl.schema import EvalDataset, Recipe
from filipctl.states import State


@dataclass
class EvalTarget:
    """What is evaluated: the weights, the recipe that built them and the data stage they came with."""

    weights: Path
    recipe_file: Path | None  # the stage's recipe.json (None: --recipe gives the recipe)
    data_dir: Path | None  # the data stage folder (held-out split), when known
    described: str  # for the tags and the console: the run id or the path given
    digest: str | None = None  # hex sha256 of the weights, when their pretrain stage recorded it


def _data_of(stage_dir: Path) -> Path | None:
    try:
        data = json.loads((stage_dir / "inputs.json").read_text()).get("data")
    except (OSError, ValueError):
        return None
    return Path(data) if data and (Path(data) / "data.json").is_file() else None


def _recorded_digest(stage_dir: Path) -> str | None:
    """The model.pt sha256 the pretrain stage in `stage_dir` wrote in its result.json, if it did."""
    digest = ((read_result(RunDir(stage_dir)) or {}).get("digests") or {}).get("model.pt")
    return digest if isinstance(digest, str) and _is_sha256(digest) else None


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _from_folder(folder: Path, described: str) -> EvalTarget:
    rd = RunDir(folder)
    if not rd.model.is_file():
        raise FilipctlError(f"{folder} holds no model.pt: give a pretrain stage folder of a finished run, a model.pt "
                            "file, or an MLflow run id (`filipctl status` lists them)")
    return EvalTarget(rd.model, rd.recipe if rd.recipe.is_file() else None, _data_of(folder), described,
                  _recorded_digest(folder))


def resolve(target: str, tracking_uri: str | None, experiment: str, timeout_s: float) -> EvalTarget:
    """RUN_OR_CHECKPOINT -> EvalTarget: a weights file, a pretrain stage folder, or an MLflow run id (prefix) or name."""
    path = Path(target).expanduser()
    if path.is_file():
        parent = RunDir(path.parent)
        # A pretrain stage's own model.pt: its result.json knows the digest; any other file is hashed later.
        digest = _recorded_digest(path.parent) if path.name == "model.pt" else None
        return EvalTarget(path, parent.recipe if parent.recipe.is_file() else None, _data_of(path.parent), str(path),
                      digest)
    if path.is_dir():
        return _from_folder(path, str(path))
    if "/" in target or target.endswith(".pt"):
        raise FilipctlError(f"{target}: no such file or folder")
    from filipctl import tracking
    from filipctl.tracking.runs import find_pipeline

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_store(uri, timeout_s, must_exist=True)
    client = tracking.open_store(uri)
    run = find_pipeline(client, experiment, target, kinds=("pipeline", "variant"))
    if TAG_EVALUATED in run.data.tags:
        raise FilipctlError(f"run {run.info.run_name} is an evaluation of {run.data.tags[TAG_EVALUATED]}; give that "
                            "run (or its model.pt) instead")
    workdir = run.data.tags.get(TAG_WORKDIR)
    if not workdir:
        raise FilipctlError(f"run {run.info.run_name} ({run.info.run_id[:8]}) records no stage folder "
                            f"(tag {TAG_WORKDIR}); give its model.pt instead")
    if run.data.tags.get(TAG_KIND) == "pipeline" and not (Path(workdir) / "model.pt").is_file():
        raise FilipctlError(f"run {run.info.run_name}: {workdir}/model.pt is missing (the run did not finish "
                            "pretraining, or its folder was moved or deleted)")
    return _from_folder(Path(workdir), run.info.run_id)


def eval_recipe(source: EvalTarget, recipe_path: str | None, sets: list[str], datasets: list[str],
                held_out: bool | None) -> Recipe:
    """The recipe of the evaluated run with --set applied; --dataset replaces eval.datasets."""
    from filipctl.recipes import load_recipe

    path = recipe_path or source.recipe_file
    if path is None:
        raise FilipctlError(f"{source.weights}: no recipe.json beside it; give the recipe that built it: "
                            "--recipe RECIPE.yaml")
    for url in datasets:
        if "://" not in url and not Path(url).expanduser().is_dir():
            raise FilipctlError(f"--dataset {url}: no such folder (an evaluation set is a folder in clip_benchmark's "
                                "layout: classnames.txt or dataset_type.txt, and test/0.tar ...)")
    recipe = load_recipe(path, sets)
    ev = recipe.eval
    update: dict[str, Any] = {"enabled": True}
    if datasets:
        update["datasets"] = [EvalDataset(url=u) for u in datasets]
    if held_out is not None:
        update["held_out"] = held_out
    if update.get("held_out", ev.held_out) and (recipe.data.eval is None or source.data_dir is None):
        update["held_out"] = False  # no data stage to read it from: only the given sets
    try:
        return recipe.model_copy(update={"eval": ev.model_validate({**ev.model_dump(), **{
            k: ([d.model_dump() for d in v] if k == "datasets" else v) for k, v in update.items()}})})
    except ValueError as exc:
        raise FilipctlError(f"--dataset: {' '.join(str(exc).split())}") from None


class _Shape:
    """Stands in for a tensor of the checkpoint: its shape, nothing of its data."""

    def __init__(self, size: tuple[int, ...]) -> None:
        self.shape = tuple(size)


class _Placeholder:
    """Stands in for a class the pickle names (torch.FloatStorage, torch.Tensor, ...) and for the storages it
    refers to (their bytes stay unread); nothing is built from it."""


def _rebuild_tensor(storage: object, offset: int, size: tuple[int, ...], *rest: object) -> _Shape:
    return _Shape(size)  # torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...)


def _rebuild_parameter(data: object, *rest: object) -> object:
    return data  # torch._utils._rebuild_parameter(_with_state)(data, requires_grad, hooks, ...)


def _rebuild_from_type(func: Any, new_type: object, args: tuple, state: object) -> object:
    return func(*args)  # torch._tensor._rebuild_from_type_v2: a tensor subclass; `func` is one of the above


# What a state dict saved by torch.save may name, mapped to stand-ins; anything else is refused unloaded.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _Placeholder,
    ("torch.nn.parameter", "Parameter"): _Placeholder,
}


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's data.pkl into dicts of `_Shape`s without importing torch or calling
    anything the pickle names but the stand-ins above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name.endswith("Storage") and name.isidentifier():  # FloatStorage, BFloat16Storage...
            return _Placeholder
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a state dict does not hold")

    def persistent_load(self, pid: Any) -> _Placeholder:
        return _Placeholder()  # pid = ('storage', type, key, location, numel): the tensor's bytes, in data/<key>


def checkpoint_shapes(weights: Path) -> Any:
    """What torch.save wrote to `weights` (a zip checkpoint), with every tensor replaced by its shape (`.shape`):
    only the archive's data.pkl is read, never the tensors' bytes. Raises ValueError saying why it cannot."""
    try:
        archive = zipfile.ZipFile(weights)
    except zipfile.BadZipFile:
        raise ValueError("not a zip archive as torch.save writes it; torch's legacy format is not read") from None
    except OSError as exc:
        raise ValueError(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"a zip archive with {len(pickles)} data.pkl, not one")
        try:
            with archive.open(pickles[0]) as f:
                return _ShapeUnpickler(f).load()
        except Exception as exc:  # a refused global, a truncated or corrupt pickle
            raise ValueError(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None


def check_weights(weights: Path, recipe: Recipe) -> None:
    """The file is a state dict of this recipe's model (its projections' shapes), checked before anything is
    submitted, without torch and without reading the tensors."""
    try:
        state = checkpoint_shapes(weights)
    except ValueError as exc:
        raise FilipctlError(f"{weights} is not a model.pt state dict torch can load ({exc}); give the model.pt a "
                            "pretrain stage wrote, or a file saved with torch.save(model.state_dict())") from None
    m = recipe.model
    expected = {"image_proj.weight": (m.embed_dim, m.image.width), "text_proj.weight": (m.embed_dim, m.text.width)}
    for name, shape in expected.items():
        got = getattr(state[name], "shape", None) if isinstance(state, dict) and name in state else None
        if got != shape:
            raise FilipctlError(f"{weights} does not hold weights of recipe {recipe.name}'s model ({name} is "
                                f"{got or 'missing'}, the recipe makes {shape}); give the recipe that built it: "
                                "--recipe RECIPE.yaml")


@dataclass
class EvalResult:
    run_id: str
    folder: Path
    metrics: dict[str, float]
    results: list[dict[str, Any]]
    cached: bool
    duration_s: float


def run_eval(source: EvalTarget, recipe: Recipe, console: Console, force: bool = False) -> EvalResult:
    from filipctl.orchestration.graph import external_graph
    from filipctl.orchestration.pipeline import GraphRun
    from filipctl.orchestration.preflight import align_to_cluster
    from filipctl.orchestration.stages import Stage, find_stage

    t0 = time.time()
    ev = recipe.eval
    if not ev.datasets and not ev.held_out:
        raise FilipctlError("nothing to evaluate: give --dataset URL (clip_benchmark layout), or evaluate a run "
                            "whose data stage has a held-out split")
    check_weights(source.weights, recipe)
    recipe = align_to_cluster(recipe, Console(quiet=True))
    stage: Stage = find_stage(recipe, "eval")
    # The weights' identity is their full sha256, "sha256:<hex>": the pipeline passes it to the job in inputs.json.
    digest = source.digest or file_sha256(source.weights)
    inputs = {"pretrain": (str(source.weights.resolve()), f"sha256:{digest}")}
    if ev.held_out and source.data_dir is not None:
        index = RunDir(source.data_dir).data_index
        inputs["data"] = (str(source.data_dir.resolve()), "data:" + hashlib.sha256(index.read_bytes()).hexdigest()[:16])
    graph = external_graph(stage, recipe, inputs, Path(recipe.output_dir))
    run = GraphRun({"": recipe}, console, force=force, graph=graph, label="eval",
                   tags={TAG_EVALUATED: source.described})
    uri = run.preflight()
    run.run(uri, "(filipctl eval)", detach=False)
    failed = run.failure()
    if failed:
        raise failed
    node = next(iter(graph.nodes.values()))
    results = [json.loads(p.read_text()) for p in sorted((node.run_dir.root / "results").glob("*.json"))]
    return EvalResult(run.top, node.run_dir.root, run.metrics.get(node.key, {}), results,
                      run.states[node.key] is State.CACHED, time.time() - t0)
