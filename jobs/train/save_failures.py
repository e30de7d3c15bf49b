"""A checkpoint save that failed on some rank: catching it inside DeepSpeed's save without leaving the other ranks
waiting, and the one line that names the cause (`no space left on /scratch (ext4) writing ...: needs about N MB`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jobs.train.checkpoint_files import one_line

def mount_of(path: Path) -> str:
    """The file system `path` is on, as a person names it: `/scratch (nfs4 server:/export)`, `/tmp/x (tmpfs)`."""
    target = os.path.realpath(path)
    best = ("/", "", "")
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            device, point, fstype = (_unescape_mount(f) for f in line.split()[:3])
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, device, fstype)
    except (OSError, ValueError):
        return _mount_point(target)
    point, device, fstype = best
    if not fstype:
        return point
    return f"{point} ({fstype})" if device in (fstype, "none", "") else f"{point} ({fstype} {device})"


def _mount_point(path: str) -> str:
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# -- a failed save ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteFailure:
    """What went wrong writing a checkpoint on one rank (sent to rank 0, so it can be pickled)."""

    rank: int
    text: str  # the exception, one line
    errno: int | None  # from the exception chain; torch's writer reports ENOSPC without one
    free_bytes: int  # free space where it wrote, right when it failed

    @classmethod
    def of(cls, exc: BaseException, rank: int, where: Path) -> "WriteFailure":
        code, seen = None, exc
        while seen is not None and code is None:
            code = seen.errno if isinstance(seen, OSError) else None
            seen = seen.__cause__ or seen.__context__
        return cls(rank, one_line(exc), code, free_bytes(where))


def free_bytes(where: Path) -> int:
    for path in (where, *where.parents):
        try:
            return shutil.disk_usage(path).free
        except OSError:
            continue
    return -1


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def save_failure_message(folder: Path, failures: list[WriteFailure], need_bytes: int, need_known: bool,
                         free_bytes: int, mount: str) -> str:
    """The one line a failed save ends the job with. DeepSpeed and torch report a full disk as
    "basic_ios::clear: iostream error" or "PytorchStreamWriter failed writing file", with no errno: a rank that
    failed with less room left than a checkpoint takes ran out of space."""
    no_space = any(f.errno in _NO_SPACE if f.errno is not None else
                   "No space left" in f.text or "Disk quota" in f.text or 0 <= f.free_bytes < need_bytes
                   for f in failures)
    first = failures[0]
    if no_space:
        mb = lambda n: f"{max(0, n) / 1e6:,.0f}"  # noqa: E731
        need = f"needs about {mb(need_bytes)} MB" if need_known else f"needs more than {mb(need_bytes)} MB"
        return (f"no space left on {mount} writing {folder}: {need}, {mb(free_bytes)} MB free; the previous "
                f"checkpoint is kept. Free space there (train.keep_checkpoints sets how many are kept) or "
                f"point output_dir elsewhere, then rerun to resume")
    return (f"I/O error writing {folder} (rank {first.rank}): {first.text}; the previous checkpoint is kept, "
            f"rerun to resume from it")


class GuardedWrites:
    """Catches this rank's first failed write inside DeepSpeed's save_checkpoint instead of raising it.

    save_checkpoint runs collectives between its writes (a barrier after making the folder, an all-reduce of
    the tag, a barrier at the end); a rank that raised out of it would leave the others waiting in one of them.
    So each write returns normally after a failure, every rank runs the whole save, and the ranks then tell
    each other how it went.
    """

    def __init__(self, engine, rank: int, where: Path) -> None:
        self.engine, self.rank, self.where = engine, rank, where
        self.failure: WriteFailure | None = None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failure is not None:
            return None  # the checkpoint is lost already: write nothing more
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.failure = WriteFailure.of(exc, self.rank, self.where)
            return None

    def __enter__(self) -> "GuardedWrites":
        self.inner = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _GuardedCheckpointEngine(self.inner, self)
        # The recovery script rank 0 copies beside the checkpoints is a write like the others.
        recovery = self.engine._copy_recovery_script
        self.engine._copy_recovery_script = lambda *a, **k: self.call(recovery, *a, **k)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.checkpoint_engine = self.inner
        del self.engine._copy_recovery_script  # the method of the class again


class _GuardedCheckpointEngine:
    """DeepSpeed's checkpoint engine with its writes (save, makedirs) going through GuardedWrites."""

    def __init__(self, inner, guard: GuardedWrites) -> None:
        self._inner, self._guard = inner, guard

    def save(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard.call(self._inner.save, *args, **kwargs)

    def makedirs(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard.call(self._inner.makedirs, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
