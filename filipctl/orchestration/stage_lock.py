"""One owner per stage folder: the `filipctl` command that runs a stage holds its lock from before it writes in
the folder until the stage ended.

The lock is `fcntl.flock` on `owner.lock` in the stage folder (local file systems, NFS, GPFS, Lustre mounted
with flock). The kernel (or the lock server) drops it when its holder dies however it dies, so a lock left by a
dead command is simply free. The holder writes who it is into the file (host, pid, command, start time) for the
commands that find it taken. Where flock is refused (ENOLCK, EOPNOTSUPP, ENOSYS: a file system without lock
support), the lock is a lease: `owner.lease`, created exclusively, its mtime refreshed by a heartbeat thread; a
lease whose owner pid is dead on this host, or not refreshed for STALE_AFTER_S, is taken over.

A second command for a stage that is held does not run it again: it follows the holder until the lock is
free, then takes the stage as the holder left it (done -> reused; else it resumes it). A stage whose job still
runs after the command that started it was killed (its job record names a live pid) is followed the same way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from filipctl.backends.local import pid_alive, process_start
from filipctl.contract import RunDir

LOCK_FILE = "owner.lock"
LEASE_FILE = "owner.lease"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 6 * HEARTBEAT_S  # a lease not refreshed for this long: its owner is gone or frozen
# flock refused by the file system: fall back to a lease.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class Owner:
    """Who holds a stage: a filipctl command, or (kind "job") a job whose command is gone."""

    host: str
    pid: int
    command: str
    since: float
    kind: str = "filipctl"
    started: int | None = None  # the pid's start time (/proc/PID/stat), to tell it from a later process with its pid

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname(), os.getpid(), " ".join(["filipctl", *sys.argv[1:]])[:500], time.time(),
                   started=process_start(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d.get("command", "")), float(d["since"]),
                       str(d.get("kind", "filipctl")), d.get("started"))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def dead(self) -> bool:
        """Known to be gone: its pid runs no more on this host (on another host nobody can tell from here)."""
        return self.host == socket.gethostname() and not pid_alive(self.pid, self.started)

    def describe(self) -> str:
        if not self.pid:
            return "another filipctl command (starting)"
        when = time.strftime("%H:%M:%S" if time.time() - self.since < 86400 else "%Y-%m-%d %H:%M", time.localtime(self.since))
        return f"{self.kind} pid {self.pid} on {self.host} since {when}"


UNKNOWN_OWNER = Owner("?", 0, "", 0.0)  # a holder that has not written its name yet


class StageLock:
    """The lock of one stage folder, taken without waiting (`take`) and given back (`release`)."""

    def __init__(self, folder: Path, owner: Owner | None = None) -> None:
        self.folder = folder
        self.owner = owner or Owner.me()
        self._fd: int | None = None
        self._lease: Path | None = None
        self._heartbeat: threading.Event | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._lease is not None

    def take(self) -> Owner | None:
        """None when this process holds the lock now, else who holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the jobs this process starts (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = Owner.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return holder or UNKNOWN_OWNER
            if exc.errno in _NO_FLOCK:
                return self._take_lease()
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.to_json().encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            # Emptied first: a command that finds the lock taken next reads its next holder's name, never ours.
            # The file itself stays: unlinking a lock file lets two commands lock two different files.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._lease is not None:
            assert self._heartbeat is not None
            self._heartbeat.set()
            if Owner.parse(_read(self._lease)) == self.owner:
                self._lease.unlink(missing_ok=True)
            self._lease = None

    # -- where flock is refused: a lease with a heartbeat --------------------------------------------------

    def _take_lease(self) -> Owner | None:
        path = self.folder / LEASE_FILE
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text = _read(path)
                holder = Owner.parse(text)
                if not self._stale(path, holder):
                    return holder or UNKNOWN_OWNER
                self._remove_stale(path, text)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.owner.to_json())
            self._lease = path
            self._heartbeat = threading.Event()
            threading.Thread(target=self._beat, args=(path, self._heartbeat), daemon=True,
                             name=f"lease {self.folder.name}").start()
            return None
        return Owner.parse(_read(path)) or UNKNOWN_OWNER

    @staticmethod
    def _stale(path: Path, holder: Owner | None) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_AFTER_S or (holder is not None and holder.dead())

    @staticmethod
    def _remove_stale(path: Path, text: str) -> None:
        """Move the stale lease aside (one rename: of two commands taking it over, one moves it); if what was moved
        is not the lease judged stale (its new owner had just written it), it goes back."""
        aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != text:
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _beat(self, path: Path, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            if Owner.parse(_read(path)) != self.owner:
                return  # taken over (this process was frozen for longer than STALE_AFTER_S): it is not ours to keep
            try:
                os.utime(path)
            except OSError:
                return


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# -- the stages of a graph run ---------------------------------------------------------------------------------

def running_job(run_dir: RunDir, stage: str) -> Owner | None:
    """The job a stage folder's record (local and Ray backends) names, while it still runs and nobody recorded its
    end: it owns the folder even when the command that started it is gone."""
    try:
        record = json.loads(run_dir.job_record(stage).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "exit_code" in record or not pid_alive(pid, record.get("pid_started")):
        return None
    since = record.get("submitted") or run_dir.job_record(stage).stat().st_mtime
    owner = int(record.get("owner", 0) or 0)
    return Owner(socket.gethostname(), pid, f"started by filipctl pid {owner}", float(since), kind="job",
                 started=record.get("pid_started"))


class StageLocks:
    """The locks of the stages a command is about to run."""

    def __init__(self) -> None:
        self.locks: dict[str, StageLock] = {}  # stage folder -> its lock

    def take(self, stages: dict[Path, str]) -> dict[Path, Owner]:
        """Lock the stage folders (folder -> stage name) -> {} when every one is ours now, else {folder: its owner}
        of the first one another owner holds; the caller runs nothing then (it releases what it took, and follows).
        In sorted order and stopping at the first: two commands that want some of the same stages (two ablations
        listing their variants in another order) never each end up with a part of them."""
        for folder, stage in sorted(stages.items()):
            lock = self.locks.get(str(folder)) or StageLock(folder)
            holder = None if lock.held else lock.take()
            if holder is not None:
                return {folder: holder}
            self.locks[str(folder)] = lock
            job = running_job(RunDir(folder), stage)
            if job is not None:
                return {folder: job}
        return {}

    def release(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()


def progress(run_dir: RunDir, stage: str) -> str:
    """The last thing the stage's job said (its events file), or ""."""
    try:
        with open(run_dir.events(stage), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return str(json.loads(lines[-1]).get("message", "")) if lines else ""
    except (OSError, ValueError, AttributeError):
        return ""
