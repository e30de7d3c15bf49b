"""Sending tracking spools to MLflow off the critical path: a background thread while a graph runs, and a
bounded drain at the end of a command (and in `filipctl status` / `filipctl sync`).

A store that stops answering is retried with back-off for as long as the command runs; nothing
the jobs do waits for it (they only append to their spools, filipctl/tracking/spool.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

from filipctl.contract import RunDir
from filipctl.tracking.spool import Spool, StoreUnavailable

BACKOFF_S = (1.0, 60.0)  # first and longest wait after the store did not answer


def stage_spool(run_dir: RunDir, uri: str) -> Spool | None:
    """A stage folder's spool with the run of store `uri` it goes to (run.json beside it); None when it has none
    there (a stage folder serves every store: its run may be in another one)."""
    run = stage_run_of(run_dir, uri)
    return Spool(run_dir.spool, run) if run else None


def stage_spools(run_dir: RunDir, uri: str) -> list[Spool]:
    """The stage's spool and its nodes' system metrics spools (contract.node_spool), all to the stage's run."""
    run = stage_run_of(run_dir, uri)
    return [Spool(p, run) for p in (run_dir.spool, *run_dir.node_spools)] if run else []


def write_stage_run(run_dir: RunDir, uri: str, run_id: str) -> None:
    """Name the MLflow run a stage folder's spool goes to (and a resumed stage continues)."""
    from filipctl.contract import write_atomic

    run_dir.tracking.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir.tracking / "run.json", json.dumps({"uri": uri, "run_id": run_id}))


def stage_run_of(run_dir: RunDir, uri: str) -> str:
    """The MLflow run in `uri` a stage folder logged to in an earlier attempt ("" when none)."""
    try:
        record = json.loads((run_dir.tracking / "run.json").read_text())
    except (OSError, ValueError):
        return ""
    return record.get("run_id", "") if record.get("uri") == uri else ""


def outboxes(folder: Path) -> list[Spool]:
    """Every command's outbox in `folder` (tracking.writer.outbox_folder), oldest first."""
    return [Spool(p) for p in sorted(folder.glob("*.jsonl")) if not p.name.endswith(".dropped.jsonl")]


def send_all(spools: list[Spool], client, deadline: float | None = None) -> str:
    """One pass over the spools in order -> "" or why it stopped (the store did not answer). A spool that cannot be
    read or written (its folder went, a full disk) is skipped: it costs its own records, not the others'."""
    for s in spools:
        try:
            s.send(client, deadline)
        except StoreUnavailable as exc:
            return str(exc)
        except OSError:
            continue
    return ""


def drain(spools: list[Spool], client, timeout_s: float) -> int:
    """Send every spool, retrying with back-off for at most `timeout_s` -> records still waiting (0: all sent)."""
    deadline = time.monotonic() + timeout_s
    delay = BACKOFF_S[0]
    while True:
        send_all(spools, client, deadline)
        left = sum(s.pending() for s in spools)
        if not left or time.monotonic() + delay > deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_S[1])


def _writer_alive(outbox: Spool) -> bool:
    """Whether the command that writes this outbox (its pid ends the name) may still append to it."""
    import os

    from filipctl.backends.local import pid_alive

    pid = outbox.path.stem.rpartition("-")[2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    return pid_alive(int(pid))


def remove_sent(spools: list[Spool]) -> None:
    """Delete outboxes whose every record went in and whose command is gone (or is this one, at its end)."""
    for s in spools:
        if s.path.is_file() and not s.pending() and not _writer_alive(s):
            for p in (s.path, s.sent_file, s.path.with_name(s.path.name + ".lock")):
                p.unlink(missing_ok=True)
            folder = s.path.with_suffix("")
            if folder.is_dir() and not any(folder.rglob("*.*")):
                import shutil

                shutil.rmtree(folder, ignore_errors=True)


class Forwarder:
    """A daemon thread that sends the spools `spools()` names while a graph runs; the store's outages only make it
    wait longer (back-off), they never reach the caller. `behind` is what it could not send yet."""

    def __init__(self, client, spools: Callable[[], list[Spool]], interval_s: float = 2.0) -> None:
        self.client = client
        self.spools = spools
        self.interval_s = interval_s
        self.last_error = ""  # the store's last complaint, for the console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="filipctl-tracking-forwarder", daemon=True)

    def start(self) -> "Forwarder":
        self._thread.start()
        return self

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.is_set():
            try:
                self.last_error = send_all(self.spools(), self.client)
                wait = min(max(wait * 2, BACKOFF_S[0]), BACKOFF_S[1]) if self.last_error else self.interval_s
            except Exception as exc:  # noqa: BLE001 - a bug here must cost tracking, never the run
                self.last_error = f"{type(exc).__name__}: {exc}"
                wait = BACKOFF_S[1]
            self._stop.wait(wait)

    def stop(self, drain_s: float) -> int:
        """Stop the thread, then send what is left for at most `drain_s` -> records still waiting."""
        t0 = time.monotonic()
        self._stop.set()
        self._thread.join(timeout=drain_s)
        return drain(self.spools(), self.client, max(0.0, drain_s - (time.monotonic() - t0)))
