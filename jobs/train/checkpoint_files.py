"""A checkpoint folder on disk, as pure functions of the folder (tests/test_checkpoint_files.py): which steps are
there, whether one is complete (every file loads; sizes as its manifest recorded), which to keep.

A checkpoint is a folder `stepN` that is complete or absent (jobs/train/checkpoints.py writes it under `stepN.tmp`
and renames it once `manifest.json` records its files); DeepSpeed's `latest` names the one to resume from.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any, Iterable

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"  # a save in progress, or one a crash interrupted
LATEST = "latest"
_STEP_FOLDER = re.compile(r"step(\d+)")


# -- what is on disk (pure functions of the folder: tests/test_checkpoint_files.py) --------------------
def step_folders(root: Path) -> dict[int, Path]:
    """The finished checkpoint folders `stepN` under root -> {N: folder} (`.tmp` ones are not finished)."""
    found = {}
    for path in root.glob("step*") if root.is_dir() else ():
        m = _STEP_FOLDER.fullmatch(path.name)
        if m and path.is_dir():
            found[int(m.group(1))] = path
    return found


def latest_step(root: Path) -> int:
    """The step `latest` names, 0 when there is none or it names no `stepN`."""
    try:
        m = _STEP_FOLDER.fullmatch((root / LATEST).read_text().strip())
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def steps_to_delete(steps: Iterable[int], current: int, keep: int, pinned: Iterable[int]) -> list[int]:
    """Retention after a verified save at `current`: the newest `keep` checkpoints up to it and the pinned steps
    stay. A step above `current` is one the resume skipped because it did not verify: it goes too."""
    steps = sorted(set(steps))
    kept = set(s for s in steps if s <= current)
    kept = set(sorted(kept)[-max(1, keep):]) | {current} | set(pinned)
    return [s for s in steps if s not in kept]


def file_problem(path: Path, expected_size: int | None = None) -> str | None:
    """Why one checkpoint file cannot be used (None when it can): missing, another size than recorded, or it
    does not load. A torch zip file is opened with mmap, so its tensors are mapped, not read: cheap."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path} is missing ({exc.strerror})" if exc.errno == errno.ENOENT else f"{path} cannot be read ({exc})"
    if expected_size is not None and size != expected_size:
        how = f"truncated: {size} of {expected_size} bytes" if size < expected_size else \
            f"{size} bytes, {expected_size} recorded when it was saved"
        return f"{path} does not load ({how})"
    try:
        if path.suffix == ".pt":
            import torch

            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except Exception as exc:  # any reason a file does not load makes the checkpoint unusable
        return f"{path} does not load ({one_line(exc)})"
    return None


def build_manifest(folder: Path, step: int) -> dict[str, Any]:
    """Load every file of a checkpoint just written -> its manifest {step, files: {name: bytes}}; raises
    CheckpointDamaged naming the first file that does not load."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        problem = file_problem(path)
        if problem:
            raise CheckpointDamaged(problem)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return {"step": step, "files": files}


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from (None when it can): every file its manifest lists
    has the recorded size and loads. A folder without a manifest (written before manifests existed) is judged
    by loading what is there."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected: dict[str, int | None] = {name: int(size) for name, size in manifest["files"].items()}
    except FileNotFoundError:
        expected = {p.relative_to(folder).as_posix(): None for p in sorted(folder.rglob("*")) if p.is_file()}
        if not any(name.endswith(".pt") for name in expected):
            return f"{folder} holds no checkpoint file"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{folder / MANIFEST} does not load ({one_line(exc)})"
    for name, size in expected.items():
        problem = file_problem(folder / name, size)
        if problem:
            return problem
    return None


def checkpoint_bytes(folder: Path) -> int:
    """The size of a checkpoint: from its manifest, else what its files take now."""
    try:
        return sum(int(s) for s in json.loads((folder / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0



def global_batch_mismatch(folder: Path, saved: int | None, expected: int) -> str | None:
    """Why a checkpoint saved with global batch `saved` cannot be continued by a run of `expected`, or None. (The
    model's shapes and the ZeRO stage are checked where the checkpoint is loaded: jobs/train/reshard.py.)"""
    if saved is None or saved == expected:
        return None
    return (f"{folder} was saved with global batch {saved}; this run has {expected}: continue it with "
            f"train.global_batch={saved}, or start afresh (--fresh)")


class CheckpointDamaged(Exception):
    """A file of a checkpoint just written does not load."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
