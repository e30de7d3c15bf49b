"""A stage's content key: the hash of everything that determines its output, so a finished stage is reused only
when nothing it depends on changed.

Three things enter a key: the recipe values the stage reads (`READS`), the keys of the stages it
reads from, and the source of every module of this repository that a worker running the stage
executes. Those modules are found by walking the imports statically (ast, nothing imported) from
the stage's job module and the backend modules that run it on the worker (`WORKER_RUNNERS`), so a
module a worker starts to import enters the key without anyone listing it. Third-party packages
are left to the environment record (filipctl/tracking/provenance.py).

`READS` is also the one definition of what determines a result: the recipe fingerprint
(filipctl/recipes.py) hashes what the stages up to pretraining read, and every recipe key is
either read by some stage or named in `UNREAD` (tests/test_stage_keys.py checks the schema).
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from filipctl.errors import FilipctlError
from filipctl.orchestration.stages import Stage, plan
from filipctl.recipes import recipe_to_dict
from filipctl.schema import Recipe
from filipctl.tracking.provenance import SOURCE_ROOT

# The recipe values each stage reads: what enters its key (a path covers everything below it).
READS: dict[str, tuple[str, ...]] = {
    "data": ("data.train", "data.eval", "data.synthetic", "data.filter"),
    "pretrain": ("model", "optim", "train", "data"),
    "eval": ("model", "eval", "name"),  # the name labels the clip_benchmark result files ("model")
}
# The recipe values no stage reads: they say where and how stages run and are tracked, not what they compute.
# A path below one in READS is taken out of it: changing how many checkpoints are kept must not start the
# stage over in a new folder.
# train.workers too: the global batch (train.global_batch) is what pretraining computes with, and a run continued on
# another number of workers is the same stage (jobs/train/batch_layout.py).
UNREAD: tuple[str, ...] = ("description", "output_dir", "tracking", "cluster", "ablation", "train.workers",
                           "train.keep_checkpoints", "train.keep_checkpoint_steps", "train.max_restarts",
                           "train.collective_timeout_s")

# This repository's packages; any other import is third-party (recorded with the environment, not hashed here).
LOCAL_PACKAGES: tuple[str, ...] = ("filipctl", "jobs", "models")
# What runs a job module on a worker besides the module itself: submitit unpickles a StageJob there, Ray starts
# the driver and unpickles its train loop in each worker. The local backend runs `python -m MODULE` alone.
WORKER_RUNNERS: tuple[str, ...] = ("filipctl.backends.slurm_task", "filipctl.backends.ray_driver")
# Every stage's job module (`Stage.module` in stages.py; tests/test_stage_keys.py checks they agree), for the
# one digest over all worker code.
JOB_MODULES: tuple[str, ...] = ("jobs.data.prepare", "jobs.train.pretrain", "jobs.eval.evaluate")


# -- the recipe values a stage reads ----------------------------------------------------------------
def _value(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def upstream(recipe: Recipe, stage: str) -> list[str]:
    """`stage` and every stage it runs after, directly or through others (in the recipe's plan)."""
    stages = {s.name: s for s in plan(recipe)}
    out: list[str] = []
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in out:
            out.append(name)
            todo.extend(stages[name].after)
    return out


def recipe_reads(recipe: Recipe, stages: Iterable[str]) -> dict[str, Any]:
    """The recipe values the given stages read, by key path (a path below another one read is left out)."""
    paths = {path for stage in stages for path in READS[stage]}
    paths = {p for p in paths if not any(p.startswith(q + ".") for q in paths)}
    d = recipe_to_dict(recipe)
    for path in UNREAD:  # operational values below a read section
        parent, _, leaf = path.rpartition(".")
        section = _value(d, parent) if parent else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return {path: _value(d, path) for path in sorted(paths)}


def eval_sets_identity(recipe: Recipe) -> list[str]:
    """What the evaluation sets hold, as far as it is cheap to see: for a local folder, every file's path, size and
    modification time (a set exported again to the same folder is a new key); a remote URL stands for itself."""
    import os

    out = []
    for d in recipe.eval.datasets:
        root = d.url.removeprefix("file://")
        if "://" in root or not os.path.isdir(root):
            out.append(d.url)
            continue
        h = hashlib.sha256()
        for folder, _dirs, files in sorted(os.walk(root)):
            for name in sorted(files):
                st = os.stat(os.path.join(folder, name))
                h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        out.append(f"{d.url}#{h.hexdigest()[:16]}")
    return out


# -- the code a worker runs -------------------------------------------------------------------------
def _module_file(root: Path, name: str) -> Path | None:
    """The file `import name` runs under root; the folder itself for a namespace package (no code of its own)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.parent / f"{base.name}.py"):
        if candidate.is_file():
            return candidate
    return base if base.is_dir() else None


def _is_local(name: str) -> bool:
    return name.split(".", 1)[0] in LOCAL_PACKAGES


@lru_cache(maxsize=None)
def _imports(root: Path, name: str, path: Path) -> tuple[str, ...]:
    """The local modules `path` (module `name`) imports anywhere in its source: at the top, inside functions,
    under TYPE_CHECKING (kept: hashing one file too many costs a rerun, one too few a stale result)."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except SyntaxError as exc:
        raise FilipctlError(f"{path}: cannot be parsed to find what the worker imports: {exc}") from None
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise FilipctlError(f"{path}: relative import beyond the top-level package (line {node.lineno})")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append(module)
            # `from pkg import sub` imports the submodule pkg.sub when there is one; otherwise sub is a name in pkg.
            out += [f"{module}.{alias.name}" for alias in node.names
                    if alias.name != "*" and _is_local(module) and _module_file(root, f"{module}.{alias.name}")]
    return tuple(dict.fromkeys(m for m in out if _is_local(m)))


@lru_cache(maxsize=None)
def worker_modules(entries: tuple[str, ...], root: Path = SOURCE_ROOT) -> tuple[str, ...]:
    """The files (paths relative to root, sorted) of every local module a worker starting at `entries` imports.

    Importing a.b.c runs a/__init__.py and a/b/__init__.py first: they count. A local module that is
    imported but not on disk raises FilipctlError: the worker would fail, and the key would miss it.
    """
    files: set[str] = set()
    seen: set[str] = set()
    todo: list[tuple[str, str]] = [(entry, "the worker entry points") for entry in entries]
    while todo:
        name, importer = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [(".".join(parts[:i]), importer) for i in range(1, len(parts))]
        path = _module_file(root, name)
        if path is None:
            raise FilipctlError(f"module {name}, imported by {importer}, is not in {root}: "
                                "the stage keys cannot cover code that is not there")
        if path.is_dir():
            continue
        files.add(path.relative_to(root).as_posix())
        todo += [(imported, str(path.relative_to(root))) for imported in _imports(root, name, path)]
    return tuple(sorted(files))


@lru_cache(maxsize=None)
def modules_digest(entries: tuple[str, ...], root: Path = SOURCE_ROOT) -> str:
    """Hash of the path and bytes of every local module a worker starting at `entries` imports."""
    h = hashlib.sha256()
    for rel in worker_modules(entries, root):
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_code_digest(module: str, root: Path = SOURCE_ROOT) -> str:
    """Hash of the code a worker of the stage with job module `module` runs, on any backend."""
    return modules_digest((module, *WORKER_RUNNERS), root)


def code_digest(root: Path = SOURCE_ROOT) -> str:
    """Hash of the code every stage's workers run together (MLflow tag filipctl.code_digest)."""
    return modules_digest((*JOB_MODULES, *WORKER_RUNNERS), root)


# -- the key ----------------------------------------------------------------------------------------
def stage_key(stage: Stage, recipe: Recipe, deps: dict[str, str], code: str | None = None,
              root: Path = SOURCE_ROOT) -> str:
    """The content key of `stage` of `recipe`, reading from the stages keyed `deps` (name -> key).

    code: the digest of the stage's worker code; None = `stage_code_digest` of its module under root.
    """
    reads = recipe_reads(recipe, [stage.name])
    if stage.name == "eval" and recipe.eval.datasets:
        reads["eval.datasets.contents"] = eval_sets_identity(recipe)
    code = code if code is not None else stage_code_digest(stage.module, root)
    blob = json.dumps({"stage": stage.name, "reads": reads, "deps": deps, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
