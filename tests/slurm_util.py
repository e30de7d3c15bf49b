"""What the tests on the real two-node Slurm cluster (scripts/slurm-up.sh) share: the cluster, sacct, the queue, and
losing a node."""

from __future__ import annotations

import fcntl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    res = subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"the test cluster did not come up:\n{res.stderr}"


def sacct(job: str) -> dict[str, str]:
    """State, submit, start, end, nodes and requeue count of a job (allocation only), from Slurm's accounting."""
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,Submit,Start,End,NodeList", "-j", job],
                         capture_output=True, text=True, check=True)
    lines = res.stdout.strip().splitlines()
    if not lines:  # slurmdbd records a fresh submission a moment later
        return {"state": "", "submit": "", "start": "", "end": "", "nodes": "", "restarts": "0"}
    state, submit, start, end, nodes = lines[0].split("|")
    return {"state": state.split()[0], "submit": submit, "start": start, "end": end, "nodes": nodes,
            "restarts": str(max(0, len(incarnations(job)) - 1))}


def incarnations(job: str) -> list[dict[str, str]]:
    """Each start of a job, first to last: state, start, end, nodes. -D lists every incarnation of a requeued job
    (Slurm 22.05's sacct has no Restarts field): the earlier ones ended REQUEUED (scontrol requeue) or NODE_FAIL."""
    res = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State,Start,End,NodeList", "-j", job],
                         capture_output=True, text=True, check=True)
    rows = [ln.split("|") for ln in res.stdout.strip().splitlines()]
    return [{"state": r[0].split()[0], "start": r[1], "end": r[2], "nodes": r[3]} for r in rows]


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


def hostnames(nodelist: str) -> list[str]:
    """A Slurm node list ("filip-n[1-2]") as host names, in order."""
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def slurm_processes(node: str) -> list[int]:
    """The Slurm processes on a test node: its slurmd, each job step's slurmstepd, and everything these started (the
    tasks and their children). Not the node's other processes: the Ray test cluster has a node in it too."""
    parent, name = {}, {}
    for pid in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name[pid] = stat[stat.index("(") + 1:stat.rindex(")")]
        parent[pid] = stat[stat.rindex(")") + 2:].split()[1]

    def slurms(pid: str) -> bool:
        seen = set()
        while pid in name and pid not in seen:
            if name[pid] in ("slurmd", "slurmstepd"):
                return True
            seen.add(pid)
            pid = parent[pid]
        return False

    return sorted(int(p) for p in name if slurms(p))


# The lost-node tests of both test clusters kill on filip-n2 (tests/ray_two_node_scenario.py holds the same lock): while
# one holds it, no other kills there, or restarts what the other killed.
NODE_KILL_LOCK = Path("/tmp/filip-node-kill.lock")


@contextmanager
def node_kill_lock() -> Iterator[float]:
    """Hold the machine-wide lock of the lost-node tests -> seconds waited for it."""
    t0 = time.time()
    with NODE_KILL_LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.time() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lose_node(node: str) -> list[int]:
    """The node is lost to Slurm: SIGKILL its slurmd and every process Slurm runs on it, all at once (a node that
    dies takes them down together). scripts/slurm-up.sh brings its slurmd back. -> the pids killed"""
    pids = slurm_processes(node)
    assert pids, f"no Slurm process on {node}"
    subprocess.run(["kill", "-9", *map(str, pids)], capture_output=True)
    return pids
