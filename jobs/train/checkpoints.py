"""Where pretraining keeps its DeepSpeed checkpoints and resumes from.

`DirectoryCheckpoints`: a folder every rank can reach (local disk, a cluster's shared file
system); DeepSpeed's `latest` file names the newest tag. Used by the local and Slurm backends.
The Ray backend supplies its own store (filipctl/backends/ray_driver.py) that reports checkpoints to Ray Train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


def data_state_file(folder: Path, rank: int) -> Path:
    """Each rank's loader position, beside its ZeRO shards (DeepSpeed's client state is rank 0's alone)."""
    return folder / f"data_rank{rank}.json"


def write_data_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    # Before DeepSpeed writes the checkpoint and its `latest`: a checkpoint `latest` names has it.
    folder.mkdir(parents=True, exist_ok=True)
    data_state_file(folder, rank).write_text(json.dumps(state))


def read_data_state(folder: Path, rank: int) -> dict[str, Any] | None:
    path = data_state_file(folder, rank)
    return json.loads(path.read_text()) if path.is_file() else None


class CheckpointStore(Protocol):
    def restore(self, engine, rank: int) -> tuple[int, str, dict[str, Any] | None]:
        """Load the newest checkpoint into the engine -> (its step, where it came from, this rank's data
        position); (0, "", None) if there is none."""

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        """Save the engine's state and this rank's data position at `step` (every rank calls this)."""


class DirectoryCheckpoints:
    def __init__(self, root: Path) -> None:
        self.root = root

    def latest_step(self) -> int:
        latest = self.root / "latest"
        if not latest.is_file():
            return 0
        tag = latest.read_text().strip()
        return int(tag.removeprefix("step")) if tag.startswith("step") else 0

    def restore(self, engine, rank: int) -> tuple[int, str, dict[str, Any] | None]:
        step = self.latest_step()
        if not step:
            return 0, "", None
        engine.load_checkpoint(str(self.root), tag=f"step{step}")
        return step, f"{self.root}/step{step}", read_data_state(self.root / f"step{step}", rank)

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        if (self.root / f"step{step}").exists() and self.latest_step() == step:
            return  # resumed exactly here: the checkpoint is already on disk
        write_data_state(self.root / f"step{step}", engine.global_rank, data_state)
        engine.save_checkpoint(str(self.root), tag=f"step{step}", client_state={"step": step})
