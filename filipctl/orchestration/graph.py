"""The stage graph: every variant's stages, each named by a content key, shared where the keys agree.

A stage's key hashes what determines its output: the recipe values it reads (`READS`), the keys of
the stages it depends on, and the source of the code that runs on workers (jobs/ and models/; not
the CLI). Its folder is `<output_dir>/stages/<stage>-<key>/`; a folder holding `done.json` for
that key is a stage already done, reused instead of run again. Two variants that resolve to the
same stage (the data of every variant of an ablation, say) share one node.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from filipctl.contract import RunDir
from filipctl.tracking.provenance import SOURCE_ROOT
from filipctl.recipes import recipe_to_dict
from filipctl.schema import Recipe
from filipctl.orchestration.stages import Stage, plan

# The recipe values each stage reads: what enters its key.
READS: dict[str, tuple[str, ...]] = {
    "data": ("data.train", "data.eval", "data.synthetic", "data.filter"),
    "pretrain": ("model", "optim", "train", "data"),
    "eval": ("model", "eval", "name"),  # the name labels the clip_benchmark result files ("model")
}
CODE_FOLDERS = ("jobs", "models")


@lru_cache(maxsize=1)
def code_digest(root: Path = SOURCE_ROOT) -> str:
    """Hash of the worker code (jobs/ and models/): a change there is a new key for every stage."""
    h = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _value(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


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


def stage_key(stage: str, recipe: Recipe, deps: dict[str, str], code: str) -> str:
    d = recipe_to_dict(recipe)
    reads = {path: _value(d, path) for path in READS[stage]}
    if stage == "eval" and recipe.eval.datasets:
        reads["eval.datasets.contents"] = eval_sets_identity(recipe)
    blob = json.dumps({"stage": stage, "reads": reads, "deps": deps, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Node:
    """One stage of the graph: run once, whatever number of variants use it."""

    key: str
    stage: Stage
    recipe: Recipe  # the recipe of the first variant that uses it (every user agrees on what it reads)
    deps: dict[str, str]  # stage name -> key of the node it reads from
    run_dir: RunDir
    variants: list[str] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)  # inputs from outside the graph: name -> folder or file

    @property
    def name(self) -> str:
        return f"{self.stage.name}-{self.key}"

    def data_unchanged(self) -> bool:
        """The shards the data stage indexed are still there with their sizes (local files; remote ones are
        trusted, since listing a bucket costs a request per shard)."""
        import os

        try:
            index = json.loads(self.run_dir.data_index.read_text())
        except (OSError, ValueError):
            return False
        entries = [*index.get("train", []), *([index["eval"]] if index.get("eval") else [])]
        for entry in entries:
            for shard, size in zip(entry["shards"], entry.get("sizes") or [None] * len(entry["shards"])):
                if size is None:
                    continue
                try:
                    if os.path.getsize(shard.removeprefix("file://")) != size:
                        return False
                except OSError:
                    return False
        return True

    def done(self) -> dict[str, Any] | None:
        """The record of a completed run of this key, if there is one."""
        try:
            record = json.loads(self.run_dir.done.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("key") == self.key else None


@dataclass
class Graph:
    nodes: dict[str, Node]  # by key, in a topological order (dependencies first)
    variants: dict[str, dict[str, str]]  # variant -> {stage name: key}
    recipes: dict[str, Recipe]

    def dependents(self, key: str) -> list[Node]:
        """Every node that reads from `key`, directly or through others."""
        out: list[Node] = []
        frontier = {key}
        for node in self.nodes.values():
            if frontier & set(node.deps.values()):
                out.append(node)
                frontier.add(node.key)
        return out


def build_graph(variants: dict[str, Recipe], output_root: Path, code: str | None = None) -> Graph:
    code = code or code_digest()
    nodes: dict[str, Node] = {}
    by_variant: dict[str, dict[str, str]] = {}
    for variant, recipe in variants.items():
        keys: dict[str, str] = {}
        for stage in plan(recipe):
            deps = {d: keys[d] for d in stage.after}
            # eval reads the data stage's index too (the held-out split), besides the model.
            if stage.name == "eval" and "data" in keys:
                deps = {"data": keys["data"], **deps}
            key = stage_key(stage.name, recipe, deps, code)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = Node(key, stage, recipe, deps, RunDir(output_root / "stages" / f"{stage.name}-{key}"))
            node.variants.append(variant)
            keys[stage.name] = key
        by_variant[variant] = keys
    return Graph(nodes, by_variant, dict(variants))


def external_graph(stage: Stage, recipe: Recipe, inputs: dict[str, tuple[str, str]], output_root: Path,
                   code: str | None = None) -> Graph:
    """A graph of one stage whose inputs already exist outside any graph (`filipctl eval` of a checkpoint).

    inputs: name -> (path, identity): the identity (a content digest) enters the key in place of a
    dependency's key, so the same checkpoint and settings find the stage done before.
    """
    code = code or code_digest()
    key = stage_key(stage.name, recipe, {name: identity for name, (_, identity) in inputs.items()}, code)
    node = Node(key, stage, recipe, {}, RunDir(output_root / "stages" / f"{stage.name}-{key}"), [""],
                {name: path for name, (path, _) in inputs.items()})
    return Graph({key: node}, {"": {stage.name: key}}, {"": recipe})
