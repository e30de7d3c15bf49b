"""Local backend: jobs are processes on this machine; a distributed stage is a torchrun group."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, ClassVar

from filipctl.backends.base import JobHandle, JobRequest
from filipctl.contract import RunDir, free_port
from filipctl.errors import FilipctlError
from filipctl.states import State


def _state_of(exit_code: int, cancelled: bool = False) -> State:
    if exit_code == 0:
        return State.COMPLETED
    # `cancelled`: filipctl asked it to stop, whatever status its signal handlers chose to exit with.
    if cancelled or exit_code in (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM):
        return State.CANCELLED
    return State.FAILED


class LocalBackend:
    """A job's ref is the path of its record file (pid, log, exit code), so any process can query it."""

    name: ClassVar[str] = "local"
    native_dependencies: ClassVar[bool] = False
    stop_grace_s: ClassVar[float] = 15.0  # after SIGTERM, before SIGKILL

    def __init__(self, max_parallel: int | None = None) -> None:
        self.max_parallel = max_parallel
        self._procs: dict[str, subprocess.Popen] = {}

    def capacity(self) -> tuple[int | None, int | None]:
        # Unless told how many stages to run at once, as many as the cores hold: one core per worker process.
        return (self.max_parallel, None) if self.max_parallel else (None, os.cpu_count() or 1)

    def attach(self, ref: str) -> JobHandle:
        record = Path(ref)
        pid = self._record(ref).get("pid", "")
        return JobHandle(self, ref, str(pid), record.parent.parent)  # <stage folder>/logs/<stage>.job.json

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        return {h.ref: self._state(h.ref) for h in handles}

    def _argv(self, request: JobRequest, port: int) -> list[str]:
        stage = request.stage
        argv = request.command(sys.executable)
        if stage.distributed:
            # torchrun: one process per worker, rendezvous on a free loopback port. A failed worker restarts the
            # whole group (it resumes from its latest checkpoint) up to train.max_restarts times.
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stage.processes}",
                    "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                    f"--max-restarts={stage.max_restarts}", *argv[1:]]
        return argv

    def validate(self, request: JobRequest) -> None:
        return None

    def describe(self, request: JobRequest) -> str:
        return " ".join(self._argv(request, 29500))

    def submit(self, request: JobRequest) -> JobHandle:
        argv = self._argv(request, free_port())
        request.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **request.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        log = open(request.log_file, "ab")
        # A new session: Ctrl-C in the terminal reaches the CLI, which cancels the whole group.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=os.getcwd(), preexec_fn=_stop_with(os.getpid()))
        log.close()
        record = request.run_dir.job_record(request.stage.name)
        # owner: this process, which records how the job ends; others only read until it is gone. The start times
        # tell the job and its owner from later processes that got their pids.
        record.write_text(json.dumps({"pid": proc.pid, "log": str(request.log_file), "argv": argv,
                                      "owner": os.getpid(), "pid_started": process_start(proc.pid),
                                      "owner_started": process_start(os.getpid()), "submitted": time.time()}))
        job_id = str(record)
        self._procs[job_id] = proc
        return JobHandle(self, job_id, str(proc.pid), request.run_dir.root)

    def _record(self, job_id: str) -> dict:
        try:
            return json.loads(Path(job_id).read_text())
        except (OSError, ValueError) as exc:
            raise FilipctlError(f"the job record {job_id} cannot be read ({type(exc).__name__}): was its run folder "
                                "moved or deleted?") from None

    def _finish(self, job_id: str, code: int) -> State:
        rec = self._record(job_id)
        rec["exit_code"] = code
        Path(job_id).write_text(json.dumps(rec))
        return _state_of(code, rec.get("cancelled", False))

    def _mark_cancelled(self, job_id: str) -> dict:
        """Record the request before signalling, so whoever sees the exit reads it as a cancel."""
        rec = self._record(job_id)
        if "exit_code" not in rec:
            rec["cancelled"] = True
            Path(job_id).write_text(json.dumps(rec))
        return rec

    def _state(self, job_id: str) -> State:
        proc = self._procs.get(job_id)
        if proc is not None:
            code = proc.poll()
            return State.RUNNING if code is None else self._finish(job_id, code)
        rec = self._record(job_id)
        if "exit_code" in rec:
            return _state_of(rec["exit_code"], rec.get("cancelled", False))
        if pid_alive(rec["pid"], rec.get("pid_started")) or pid_alive(rec.get("owner", 0), rec.get("owner_started")):
            return State.RUNNING  # (or just ended: the process that started it is about to record how)
        if rec.get("cancelled"):
            return State.CANCELLED
        # Gone, and whoever started it did not see it end (that CLI was killed, and the job stopped with it:
        # _stop_with): its result says how it ended.
        return State.COMPLETED if RunDir(Path(job_id).parent.parent).result.is_file() else State.FAILED

    def _ask_to_stop(self, pid: int) -> None:
        os.killpg(pid, signal.SIGTERM)  # the whole group: torchrun and its workers

    def cancel(self, handle: JobHandle) -> None:
        job_id = handle.ref
        pid = self._mark_cancelled(job_id)["pid"]
        try:
            self._ask_to_stop(pid)
        except ProcessLookupError:
            return
        deadline = time.time() + self.stop_grace_s
        while time.time() < deadline and pid_alive(pid):
            time.sleep(0.2)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever outlived the grace period
        except ProcessLookupError:
            pass
        proc = self._procs.get(job_id)
        if proc is not None:
            proc.wait()

    def logs(self, handle: JobHandle) -> str:
        path = Path(self._record(handle.ref)["log"])
        return path.read_text(errors="replace") if path.exists() else ""


def process_start(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (/proc/PID/stat field 22); None when it is gone or a zombie
    (exited, not yet reaped by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def pid_alive(pid: int, started: int | None = None) -> bool:
    """The process runs, and is the one that started at `started` when that was recorded (not a later one that got
    its pid)."""
    now = process_start(pid) if pid > 0 else None
    return now is not None and (started is None or now == started)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _stop_with(owner: int) -> Callable[[], None] | None:
    """Popen's preexec_fn: the job gets SIGTERM when the CLI that starts it dies, SIGKILL included.

    A local job has no scheduler but its CLI: orphaned, it would train on unrecorded, in the stage folder the next
    command takes over. Stopped, it is recorded FAILED (`filipctl status`) and the rerun resumes from its last
    checkpoint. torchrun passes SIGTERM on to its workers and waits for them. (The signal follows the thread that
    forked: the runner submits from the main thread.)"""
    if _libc is None:  # not Linux: no such prctl; Ctrl-C and `filipctl cancel` still stop the group
        return None
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != owner:  # the CLI died before the prctl: nobody would send it
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
