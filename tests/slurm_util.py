"""What the tests on the real Slurm cluster (scripts/slurm-up.sh) share: the cluster, sacct, the queue."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    res = subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"the test cluster did not come up:\n{res.stderr}"


def sacct(job: str) -> dict[str, str]:
    """State, submit, start, end and requeue count of a job (allocation only), from Slurm's accounting."""
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,Submit,Start,End", "-j", job],
                         capture_output=True, text=True, check=True)
    lines = res.stdout.strip().splitlines()
    if not lines:  # slurmdbd records a fresh submission a moment later
        return {"state": "", "submit": "", "start": "", "end": "", "restarts": "0"}
    state, submit, start, end = lines[0].split("|")
    # -D lists every incarnation of a requeued job (Slurm 22.05's sacct has no Restarts field).
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job],
                             capture_output=True, text=True, check=True).stdout.split()
    return {"state": state.split()[0], "submit": submit, "start": start, "end": end,
            "restarts": str(history.count("REQUEUED"))}


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def my_queue() -> list[str]:
    res = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, check=True)
    return [ln for ln in res.stdout.splitlines() if "filip-" in ln]


def recording_sacct(folder: Path) -> Path:
    """Write an `sacct` into `folder` that logs each call ("<unix time> <args>") and runs the real one.

    Put `folder` first on PATH to count the real sacct invocations a piece of code makes; returns the log.
    """
    calls = folder / "sacct-calls.log"
    calls.touch()
    wrapper = folder / "sacct"
    wrapper.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> "{calls}"\nexec /usr/bin/sacct "$@"\n')
    wrapper.chmod(0o755)
    return calls
