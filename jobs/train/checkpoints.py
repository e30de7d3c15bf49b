"""Where pretraining keeps its DeepSpeed checkpoints and resumes from.

`DirectoryCheckpoints`: a folder every rank can reach (local disk, a cluster's shared file
system). Used by the local and Slurm backends. The Ray backend supplies its own store
(filipctl/backends/ray_driver.py) that reports checkpoints to Ray Train.

A checkpoint is a folder `stepN` that is complete or absent:
every rank writes under `stepN.tmp`; rank 0 then loads every file and records the sizes in
`stepN.tmp/manifest.json`, renames the folder to `stepN` and only then points `latest` at it.
A save that fails on any rank (disk full, I/O error) removes its `.tmp` folder, leaves the
previous checkpoint and `latest` as they were, and fails the job with one line naming the cause.
On resume the newest checkpoint that verifies is used; one that does not is named with the file
and the reason. After each save only the newest `keep` checkpoints and the pinned steps remain.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from filipctl.contract import JobError, write_atomic
from jobs.train.checkpoint_files import (LATEST, MANIFEST, TMP_SUFFIX, CheckpointDamaged, build_manifest,
                                         checkpoint_bytes, checkpoint_problem, global_batch_mismatch, latest_step,
                                         step_folders, steps_to_delete)
from jobs.train.save_failures import GuardedWrites, WriteFailure, free_bytes, mount_of, save_failure_message


def data_state_file(folder: Path, rank: int) -> Path:
    """Each rank's loader position, beside its ZeRO shards (DeepSpeed's client state is rank 0's alone)."""
    return folder / f"data_rank{rank}.json"


def write_data_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data_state_file(folder, rank).write_text(json.dumps(state))


def read_data_states(folder: Path) -> list[dict[str, Any]]:
    """The loader positions every rank of the run that saved `folder` recorded, in rank order (whatever the world
    size then: the loader deals them to this run's ranks)."""
    found = {int(p.stem.removeprefix("data_rank")): p for p in folder.glob("data_rank*.json")
             if p.stem.removeprefix("data_rank").isdigit()}
    return [json.loads(found[r].read_text()) for r in sorted(found)]


@dataclass
class Restored:
    """What a resume found: the step, where it came from, every old rank's data position, the world size and
    DeepSpeed client state it was saved with. step 0: nothing to resume from."""

    step: int = 0
    source: str = ""
    data_states: list[dict[str, Any]] = field(default_factory=list)
    saved_world: int = 0
    client_state: dict[str, Any] = field(default_factory=dict)


def load_into(engine, root: Path, tag: str, global_batch: int) -> Restored:
    """Every rank: the checkpoint `root/tag` into the engine at this run's world size (DeepSpeed's own load at the
    size that saved it, re-partitioned from the saved ranks' files at another: jobs/train/reshard.py). A checkpoint
    of another global batch, model or ZeRO stage: a JobError names the difference before anything is loaded."""
    from jobs.train.reshard import load_resharded, model_states

    folder = root / tag
    saved = model_states(folder)  # what saved it (DeepSpeed's file, mapped; a JobError when it does not load)
    problem = global_batch_mismatch(folder, saved.get("global_batch"), global_batch)
    if problem:
        raise JobError(problem)
    world = int(saved["dp_world_size"])
    client = load_resharded(engine, root, tag)
    return Restored(int(tag.removeprefix("step")), str(folder), read_data_states(folder), world, dict(client or {}))


class CheckpointStore(Protocol):
    def restore(self, engine, global_batch: int) -> Restored:
        """Load the newest checkpoint into the engine (every rank calls this; see load_into)."""

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        """Save the engine's state and this rank's data position at `step` (every rank calls this)."""



# -- between ranks ---------------------------------------------------------------------------------------
def _from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_every_rank(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _say(message: str) -> None:
    from jobs.events import emit

    emit(message, stage="pretrain")


class DirectoryCheckpoints:
    def __init__(self, root: Path, keep: int = 3, pinned: Iterable[int] = ()) -> None:
        self.root = root
        self.keep = keep  # recipe train.keep_checkpoints
        self.pinned = frozenset(pinned)  # recipe train.keep_checkpoint_steps
        self.resumed_from = 0

    def latest_step(self) -> int:
        return latest_step(self.root)

    # -- resume ------------------------------------------------------------------------------------------
    def restore(self, engine, global_batch: int) -> Restored:
        tag = ""
        if engine.global_rank == 0:
            self._remove_unfinished()
            tag = self._newest_usable()
        tag = _from_rank0(tag)  # every rank loads the checkpoint rank 0 verified
        if not tag:
            return Restored()
        restored = load_into(engine, self.root, tag, global_batch)
        self.resumed_from = restored.step
        return restored

    def _newest_usable(self) -> str:
        """Rank 0: the newest checkpoint that verifies ("" when none does), naming each one passed over."""
        folders = step_folders(self.root)
        latest = self.latest_step()
        for step in sorted(folders, reverse=True):
            folder = folders[step]
            if not (folder / MANIFEST).exists() and step > latest:
                # Written before manifests existed, and `latest` (moved last) never named it: a save cut short.
                _say(f"checkpoint {folder.name} is not used: {folder} is incomplete ({LATEST} never named it)")
                continue
            problem = checkpoint_problem(folder)
            if problem is None:
                if step != latest:  # `latest` names what a resume would use, never a checkpoint passed over
                    with contextlib.suppress(OSError):  # only a pointer for people and tools: the scan decides
                        write_atomic(self.root / LATEST, folder.name)
                return folder.name
            _say(f"checkpoint {folder.name} is not used: {problem}")
        if folders:
            _say(f"warning: no checkpoint in {self.root} can be resumed from; pretraining starts from step 0")
        return ""

    def _remove_unfinished(self) -> None:
        """Rank 0: `.tmp` folders and files a crashed save left (nothing writes them now)."""
        for path in self.root.glob(f"*{TMP_SUFFIX}") if self.root.is_dir() else ():
            print(f"removing {path}: left by a save that did not finish", flush=True)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    # -- save --------------------------------------------------------------------------------------------
    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        final = self.root / f"step{step}"
        if step == self.resumed_from:
            return  # resumed exactly here: the checkpoint is already on disk
        rank = engine.global_rank
        tmp = self.root / f"{final.name}{TMP_SUFFIX}"
        if rank == 0:
            # Before save_checkpoint's first barrier, which no rank writes before.
            self._remove_unfinished()
        with GuardedWrites(engine, rank, self.root) as guard:
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={**metrics, "step": step},
                                   save_latest=False)
            guard.call(write_data_state, tmp, rank, data_state)
        failures = [f for f in _from_every_rank(guard.failure) if f is not None]
        message = None
        if rank == 0:
            message = self._give_up(tmp, final, failures) if failures else self._commit(tmp, final, step)
        message = _from_rank0(message)  # every rank fails with rank 0's line, after rank 0 cleaned up
        if message:
            raise JobError(message)

    def _commit(self, tmp: Path, final: Path, step: int) -> str | None:
        """Rank 0, every rank's files written: verify, record, rename, move `latest`, prune -> the failure line or
        None."""
        t0 = time.perf_counter()
        try:
            manifest = build_manifest(tmp, step)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():  # passed over on resume as damaged: this save replaces it
                shutil.rmtree(final)
            tmp.rename(final)
            write_atomic(self.root / LATEST, final.name)
        except (OSError, CheckpointDamaged) as exc:
            return self._give_up(tmp, final, [WriteFailure.of(exc, 0, self.root)])
        mb = sum(manifest["files"].values()) / 1e6
        print(f"checkpoint {final}: {len(manifest['files'])} files, {mb:.1f} MB, verified in "
              f"{time.perf_counter() - t0:.2f} s", flush=True)
        self._prune(step)
        return None

    def _give_up(self, tmp: Path, final: Path, failures: list[WriteFailure]) -> str:
        """Rank 0: remove what the failed save wrote -> the line that ends the job."""
        written = checkpoint_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = {s: f for s, f in step_folders(self.root).items() if f != final}
        need = checkpoint_bytes(previous[max(previous)]) if previous else 0  # a checkpoint takes what the last one did
        return save_failure_message(final, failures, max(need, written), bool(need), free_bytes(self.root),
                                    mount_of(self.root))

    def _prune(self, current: int) -> None:
        folders = step_folders(self.root)
        for step in steps_to_delete(folders, current, self.keep, self.pinned):
            shutil.rmtree(folders[step], ignore_errors=True)
