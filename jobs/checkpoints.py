"""Where pretraining keeps its DeepSpeed checkpoints and resumes from.

`DirectoryCheckpoints`: a folder every rank can reach (local disk, a cluster's shared file
system); DeepSpeed's `latest` file names the newest tag. Used by the local and Slurm backends.
The Ray backend supplies its own store (filipctl/backends/ray_driver.py) that reports checkpoints to Ray Train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class CheckpointStore(Protocol):
    def restore(self, engine) -> tuple[int, str]:
        """Load the newest checkpoint into the engine -> (its step, where it came from); (0, "") if none."""

    def save(self, engine, step: int, metrics: dict[str, Any]) -> None:
        """Save the engine's state at `step` (every rank calls this)."""


class DirectoryCheckpoints:
    def __init__(self, root: Path) -> None:
        self.root = root

    def latest_step(self) -> int:
        latest = self.root / "latest"
        if not latest.is_file():
            return 0
        tag = latest.read_text().strip()
        return int(tag.removeprefix("step")) if tag.startswith("step") else 0

    def restore(self, engine) -> tuple[int, str]:
        step = self.latest_step()
        if not step:
            return 0, ""
        engine.load_checkpoint(str(self.root), tag=f"step{step}")
        return step, f"{self.root}/step{step}"

    def save(self, engine, step: int, metrics: dict[str, Any]) -> None:
        if (self.root / f"step{step}").exists() and self.latest_step() == step:
            return  # resumed exactly here: the checkpoint is already on disk
        engine.save_checkpoint(str(self.root), tag=f"step{step}", client_state={"step": step})
