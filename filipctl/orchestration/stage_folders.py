"""The stage folders of a graph: what earlier runs left there (done records), and the folders made ready for a run.

A stage folder holds what the CLI writes before its job starts (recipe.json, inputs.json), what the
job writes (its outputs, result.json) and what the CLI writes when it completed (done.json).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from filipctl.contract import RunDir, read_result, write_atomic
from filipctl.errors import FilipctlError
from filipctl.orchestration.executor import DoneRecord
from filipctl.orchestration.graph import Graph, Node
from filipctl.recipes import recipe_to_dict


def done_records(graph: Graph) -> dict[str, DoneRecord | None]:
    """Each node's done record, as far as reuse goes; a data stage whose shards changed since has none."""
    out: dict[str, DoneRecord | None] = {}
    for key, node in graph.nodes.items():
        record = node.done()
        if record is None or "id" not in record or (node.stage.name == "data" and not node.data_unchanged()):
            out[key] = None
        else:
            out[key] = DoneRecord(record["id"], dict(record.get("inputs", {})))
    return out


def prepare(graph: Graph, nodes: list[Node], fresh: bool) -> None:
    """The folders of the stages about to run: recipe.json, inputs.json, logs/; an old done.json removed.

    inputs.json names the folder of each stage read from (and, for inputs from outside the graph, the
    file and the sha256 the CLI already took of it, so that the job need not hash it again).
    """
    output_dir = graph.nodes[next(iter(graph.nodes))].run_dir.root.parent.parent
    try:
        for node in nodes:
            if fresh and node.run_dir.root.exists():
                _empty(node.run_dir.root)
            node.run_dir.logs.mkdir(parents=True, exist_ok=True)
            node.run_dir.done.unlink(missing_ok=True)
            write_atomic(node.run_dir.recipe, json.dumps(recipe_to_dict(node.recipe), indent=1))
            inputs: dict[str, object] = {name: path for name, (path, _) in node.external.items()}
            inputs.update({name: str(graph.nodes[key].run_dir.root) for name, key in node.deps.items()})
            digests = {name: identity.removeprefix("sha256:") for name, (_, identity) in node.external.items()
                       if identity.startswith("sha256:")}
            if digests:
                inputs["digests"] = digests
            write_atomic(node.run_dir.inputs_file, json.dumps(inputs, indent=1))
    except OSError as exc:
        raise FilipctlError(f"cannot write the run folder under {output_dir}: {exc.strerror or exc}; set output_dir "
                            "to a writable folder") from None


def _empty(folder: Path) -> None:
    """Everything in a stage folder but the lock this command holds on it (stage_lock.py): a new lock file in its
    place would let a second command lock it too."""
    from filipctl.orchestration.stage_lock import LOCK_FILE, LEASE_FILE

    for child in folder.iterdir():
        if child.name in (LOCK_FILE, LEASE_FILE):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def record_done(run_dir: RunDir, key: str, stage: str) -> dict[str, float] | None:
    """done.json for a stage whose job completed -> its metrics; None when the job left no result.json.

    The record names the done record of each stage it read (their folders are in inputs.json): a stage
    read from it is reused only while those stand.
    """
    result = read_result(run_dir)
    if result is None:
        return None
    inputs: dict[str, str] = {}
    for name, folder in _input_folders(run_dir).items():
        dep = RunDir(Path(folder))
        try:
            record = json.loads(dep.done.read_text())
            inputs[record["key"]] = record["id"]
        except (OSError, ValueError, KeyError):
            continue  # an input from outside the graph (a model.pt): its digest is in the key already
    write_atomic(run_dir.done, json.dumps({
        "key": key, "id": uuid.uuid4().hex, "stage": stage, "metrics": result["metrics"],
        "digests": result.get("digests", {}), "inputs": inputs, "mlflow_run": result.get("mlflow_run", ""),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return result["metrics"]


def _input_folders(run_dir: RunDir) -> dict[str, str]:
    try:
        inputs = json.loads(run_dir.inputs_file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in inputs.items() if isinstance(v, str)}
