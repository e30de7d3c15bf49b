"""The stage graph: every variant's stages, each named by a content key, shared where the keys agree.

A stage's key hashes what determines its output (filipctl/orchestration/stage_keys.py): the recipe
values it reads, the keys of the stages it depends on, and the source of every module its workers
import (not the CLI). Its folder is `<output_dir>/stages/<stage>-<key>/`; a folder holding
`done.json` for that key is a stage already done, reused instead of run again. Two variants that
resolve to the same stage (the data of every variant of an ablation, say) share one node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filipctl.contract import RunDir
from filipctl.schema import Recipe
from filipctl.orchestration.stage_keys import stage_key
from filipctl.orchestration.stages import Stage, plan


@dataclass
class Node:
    """One stage of the graph: run once, whatever number of variants use it."""

    key: str
    stage: Stage
    recipe: Recipe  # the recipe of the first variant that uses it (every user agrees on what it reads)
    deps: dict[str, str]  # stage name -> key of the node it reads from
    run_dir: RunDir
    variants: list[str] = field(default_factory=list)
    # Inputs from outside the graph: name -> (folder or file, identity: a content digest, "sha256:<hex>" for a file).
    external: dict[str, tuple[str, str]] = field(default_factory=dict)

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


def build_graph(variants: dict[str, Recipe], output_root: Path, code: str | None = None) -> Graph:
    nodes: dict[str, Node] = {}
    by_variant: dict[str, dict[str, str]] = {}
    for variant, recipe in variants.items():
        keys: dict[str, str] = {}
        for stage in plan(recipe):
            deps = {d: keys[d] for d in stage.after}
            # eval reads the data stage's index too (the held-out split), besides the model.
            if stage.name == "eval" and "data" in keys:
                deps = {"data": keys["data"], **deps}
            key = stage_key(stage, recipe, deps, code)  # code None: the digest of this stage's worker code
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
    key = stage_key(stage, recipe, {name: identity for name, (_, identity) in inputs.items()}, code)
    node = Node(key, stage, recipe, {}, RunDir(output_root / "stages" / f"{stage.name}-{key}"), [""],
                dict(inputs))
    return Graph({key: node}, {"": {stage.name: key}}, {"": recipe})
