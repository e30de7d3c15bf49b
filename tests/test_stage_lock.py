"""The stage folder lock (filipctl/orchestration/stage_lock.py): one owner per stage, a dead owner's lock taken over.

Real locks between real processes; the one test double is a file system that refuses flock (fcntl.flock patched
to fail with ENOLCK), to reach the lease that stands in for it there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filipctl.contract import RunDir
from filipctl.orchestration import stage_lock
from filipctl.orchestration.stage_lock import LEASE_FILE, LOCK_FILE, Owner, StageLock, StageLocks

HOLD = """
import sys, time
from pathlib import Path
from filipctl.orchestration.stage_lock import StageLock
lock = StageLock(Path(sys.argv[1]))
assert lock.take() is None
print("held", flush=True)
time.sleep(600)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_taker_is_told_who_holds_it_until_it_is_released(tmp_path: Path) -> None:
    first, second = StageLock(tmp_path / "pretrain-1"), StageLock(tmp_path / "pretrain-1")
    assert first.take() is None
    holder = second.take()
    assert holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert "filipctl" in holder.command and abs(holder.since - time.time()) < 60
    assert f"filipctl pid {os.getpid()} on {socket.gethostname()} since" in holder.describe()
    first.release()
    assert second.take() is None
    second.release()


def test_a_lock_held_by_a_process_that_was_killed_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "pretrain-2"
    holder_proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder_proc.stdout.readline().strip() == "held"
        mine = StageLock(folder)
        holder = mine.take()
        assert holder is not None and holder.pid == holder_proc.pid  # the live owner, by name
        os.kill(holder_proc.pid, signal.SIGKILL)
        holder_proc.wait(timeout=30)
        # The dead owner's name is still in the file; its lock went with it.
        assert Owner.parse((folder / LOCK_FILE).read_text()).pid == holder_proc.pid
        assert mine.take() is None
        assert Owner.parse((folder / LOCK_FILE).read_text()).pid == os.getpid()
        mine.release()
        assert (folder / LOCK_FILE).read_text() == ""  # no stale name for the next command to read
    finally:
        if holder_proc.poll() is None:
            holder_proc.kill()


def _no_flock(fd, op):  # a file system without lock support
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_a_lease_stands_in_and_a_stale_one_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stage_lock.fcntl, "flock", _no_flock)
    folder = tmp_path / "pretrain-3"
    first, second = StageLock(folder), StageLock(folder)
    assert first.take() is None and (folder / LEASE_FILE).is_file()
    assert second.take().pid == os.getpid()  # a live lease: not taken
    first.release()
    assert not (folder / LEASE_FILE).exists()

    # Left by a command that died on this host: taken over at once.
    dead = Owner(socket.gethostname(), _dead_pid(), "filipctl run x", time.time() - 5)
    (folder / LEASE_FILE).write_text(dead.to_json())
    assert second.take() is None and Owner.parse((folder / LEASE_FILE).read_text()) == second.owner
    second.release()

    # From another host: its heartbeat decides. Fresh -> held; not refreshed for STALE_AFTER_S -> taken over.
    other = Owner("node-17", 4242, "filipctl run x", time.time() - 600)
    (folder / LEASE_FILE).write_text(other.to_json())
    assert second.take() == other
    old = time.time() - stage_lock.STALE_AFTER_S - 1
    os.utime(folder / LEASE_FILE, (old, old))
    assert second.take() is None
    second.release()


def test_the_lease_heartbeat_keeps_it_fresh(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stage_lock.fcntl, "flock", _no_flock)
    monkeypatch.setattr(stage_lock, "HEARTBEAT_S", 0.1)
    lock = StageLock(tmp_path / "s")
    assert lock.take() is None
    path = tmp_path / "s" / LEASE_FILE
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()


def test_a_job_still_running_after_its_command_died_owns_the_folder(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "pretrain-4")
    run_dir.logs.mkdir(parents=True)
    job = subprocess.Popen(["sleep", "600"])
    try:
        from filipctl.backends.local import process_start

        run_dir.job_record("pretrain").write_text(json.dumps(
            {"pid": job.pid, "pid_started": process_start(job.pid), "owner": _dead_pid(), "submitted": time.time()}))
        locks = StageLocks()
        busy = locks.take({run_dir.root: "pretrain"})
        assert busy[run_dir.root].kind == "job" and busy[run_dir.root].pid == job.pid
        locks.release()
        job.kill()
        job.wait()
        assert locks.take({run_dir.root: "pretrain"}) == {}
        locks.release()
        # A recorded end, or a later process that got the pid (another start time): not a running job.
        run_dir.job_record("pretrain").write_text(json.dumps({"pid": os.getpid(), "pid_started": 1, "owner": 1}))
        assert stage_lock.running_job(run_dir, "pretrain") is None
    finally:
        if job.poll() is None:
            job.kill()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
