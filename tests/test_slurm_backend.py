"""SlurmBackend on its own, against the real two-node cluster of scripts/slurm-up.sh: tiny jobs, real sbatch, sacct.

The sacct calls are counted by a recording `sacct` first on PATH (tests/slurm_util.recording_sacct),
not mocked: what is measured is what the scheduler's accounting was asked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from filipctl.backends.base import JobHandle, JobRequest
from filipctl.backends.slurm import SlurmBackend
from filipctl.contract import RunDir, port_from_job_id
from filipctl.orchestration.stages import Stage
from filipctl.schema import SlurmProfile
from filipctl.states import State
from tests.slurm_util import recording_sacct, sacct, slurm_cluster  # noqa: F401 (slurm_cluster: autouse)

pytestmark = pytest.mark.xdist_group("slurm")  # one worker runs every test of the one test cluster

MIN_S, MAX_S = 0.25, 2.0  # the back-off under test: 0.25, 0.5, 1, 2, 2, ... seconds between sacct calls
LATE_S = 1.0  # how much later than due a call may come: sacct's own run time on a busy machine (2 cores, 2 test workers)

# The stage job: prints, waits for a file if told to, exits with the status it is told.
TINY_JOB = '''
import json, time
from pathlib import Path


def main(argv):
    workdir = Path(argv[argv.index("--workdir") + 1])
    plan = json.loads((workdir / "plan.json").read_text())
    print(f"tinyjob {workdir.name} started", flush=True)
    deadline = time.time() + 120  # never outlive a test that died
    while plan["wait_for"] and not Path(plan["wait_for"]).exists() and time.time() < deadline:
        time.sleep(0.1)
    return plan["exit"]
'''

# A distributed stage job: joins the group slurm_task.StageJob describes (gloo), all-reduces, and records where its
# rank ran, the rendezvous and the addresses it talked to. Every rank of the jobs in plan["started"] is up before the
# group forms and every rank of them has reduced before it closes: the groups are alive at the same time.
DIST_JOB = '''
import json, os, socket, time
from datetime import timedelta
from pathlib import Path


def main(argv):
    workdir = Path(argv[argv.index("--workdir") + 1])
    plan = json.loads((workdir / "plan.json").read_text())
    rank = int(os.environ["RANK"])
    (workdir / f"started{rank}").touch()
    deadline = time.time() + 120  # never outlive a test that died

    def wait(paths):
        while not all(Path(p).exists() for p in paths):
            if time.time() > deadline:
                raise TimeoutError(f"waited 120 s for {paths}")
            time.sleep(0.1)

    wait(plan["started"])
    import psutil
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    peers = {c.raddr.ip.removeprefix("::ffff:") for c in psutil.Process().net_connections("tcp") if c.raddr}
    record = {"host": socket.gethostname(), "rendezvous": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
              "sum": total.item(), "peers": sorted(peers)}
    (workdir / f"rank{rank}.tmp").write_text(json.dumps(record))
    (workdir / f"rank{rank}.tmp").rename(workdir / f"rank{rank}.json")
    wait(plan["reduced"])
    dist.destroy_process_group()
    return 0
'''


class Cluster:
    """A SlurmBackend whose jobs run TINY_JOB, and the log of every sacct it calls."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        (tmp_path / "mods").mkdir()
        (tmp_path / "mods" / "tinyjob.py").write_text(TINY_JOB)
        (tmp_path / "mods" / "distjob.py").write_text(DIST_JOB)
        # The job module reaches the node through the profile's setup lines, as a site's own modules would.
        self.profile = SlurmProfile(time_min=5,
                                    setup=[f"export PYTHONPATH={tmp_path / 'mods'}${{PYTHONPATH:+:$PYTHONPATH}}"])
        self.backend = SlurmBackend(self.profile, poll_interval_s=(MIN_S, MAX_S))
        self.sacct_log = recording_sacct(tmp_path)
        self.submitted: list[JobHandle] = []

    def submit(self, name: str, exit: int = 0, wait_for: Path | None = None,
               after: tuple[JobHandle, ...] = ()) -> JobHandle:
        run_dir = RunDir(self.root / "stages" / name)
        run_dir.root.mkdir(parents=True)
        (run_dir.root / "plan.json").write_text(json.dumps({"exit": exit, "wait_for": wait_for and str(wait_for)}))
        handle = self.backend.submit(JobRequest(Stage(name, "tinyjob"), run_dir, after=after))
        self.submitted.append(handle)
        return handle

    def sacct_calls(self) -> list[tuple[float, str]]:
        """(unix time, arguments) of each real sacct invocation so far."""
        lines = self.sacct_log.read_text().splitlines()
        return [(float(t), args) for t, _, args in (ln.partition(" ") for ln in lines)]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = Cluster(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    yield c
    if c.submitted:  # a failed test leaves no job waiting on the node
        subprocess.run(["scancel", *(h.label for h in c.submitted)], capture_output=True)


def poll_until(backend: SlurmBackend, handles: list[JobHandle], done, timeout: float) -> dict[str, State]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = backend.poll(handles)
        if done(states):
            return states
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f}s; last states {states}")


def test_one_batched_sacct_call_per_interval_backing_off(cluster: Cluster) -> None:
    release = cluster.root / "release"
    held = [cluster.submit(f"held{i}", wait_for=release) for i in range(3)]
    later = cluster.submit("later", wait_for=cluster.root / "release-later", after=(held[0],))
    handles = [*held, later]
    ids = ",".join(sorted(h.label for h in handles))
    settled = {**{h.ref: State.RUNNING for h in held}, later.ref: State.QUEUED}

    poll_until(cluster.backend, handles, lambda s: s == settled, 60)
    # The poll that saw the last change called sacct and reset the interval: from here nothing changes.
    start = len(cluster.sacct_calls())
    polls, t_end = 0, time.time() + 6.5
    while time.time() < t_end:
        assert cluster.backend.poll(handles) == settled
        polls += 1
        time.sleep(0.01)
    calls = cluster.sacct_calls()[start - 1:]
    gaps = [round(b[0] - a[0], 2) for a, b in zip(calls, calls[1:])]
    print(f"quiet 6.5 s: {polls} polls of {len(handles)} jobs, {len(calls) - 1} sacct calls, gaps {gaps}")
    # (a) each call asks for all four jobs at once
    assert all(args.endswith(f"--jobs={ids}") for _, args in calls), calls
    # (b, c) at most one call per interval, due calls not skipped, the interval doubling to its cap
    expected = [min(MIN_S * 2**i, MAX_S) for i in range(len(gaps))]
    assert len(gaps) >= 4 and all(e <= g < e + LATE_S for g, e in zip(gaps, expected)), (gaps, expected)
    assert polls > 20 * len(gaps)
    # afterok: the nodes have room (8 CPUs each, 4 one-CPU jobs), yet Slurm holds the dependent job.
    reason = subprocess.run(["squeue", "-h", "-o", "%r", "-j", later.label], capture_output=True, text=True).stdout
    assert reason.strip() == "Dependency"

    # A change resets the interval: the next call comes MIN_S after the one that saw it.
    quiet = len(cluster.sacct_calls())
    release.touch()
    seen: list[tuple[float, str, dict[str, State]]] = []  # each sacct call: its time, arguments, what it answered
    deadline = time.time() + 60
    while time.time() < deadline:
        states = cluster.backend.poll(handles)
        if len(cluster.sacct_calls()) > quiet + len(seen):
            seen.append((*cluster.sacct_calls()[-1], states))
            if [s != settled for _, _, s in seen[:-1]].count(True) == 1:  # saw the call after the change: end it
                (cluster.root / "release-later").touch()
        if all(s.ended for s in states.values()):
            break
        time.sleep(0.01)
    first_change = next(i for i, (_, _, s) in enumerate(seen) if s != settled)
    assert MIN_S <= seen[first_change + 1][0] - seen[first_change][0] < MIN_S + LATE_S < MAX_S, seen
    # Ended jobs are not asked about again; once all ended, polls call no sacct at all.
    for (_, _, before), (_, args, _) in zip(seen, seen[1:]):
        assert args.endswith("--jobs=" + ",".join(sorted(h.label for h in handles if not before[h.ref].ended)))
    n = len(cluster.sacct_calls())
    for _ in range(20):
        cluster.backend.poll(handles)
        time.sleep(0.05)
    assert len(cluster.sacct_calls()) == n == cluster.backend.sacct.calls
    print(f"after release: sacct calls at {[round(t - seen[0][0], 2) for t, _, _ in seen]} s; {n} sacct calls in all")

    # (e) afterok: the dependent job started only once the job it waited for had ended.
    assert cluster.backend.poll(handles) == {h.ref: State.COMPLETED for h in handles}
    assert sacct(later.label)["start"] >= sacct(held[0].label)["end"]


def test_ended_states_and_attach_from_a_fresh_backend(cluster: Cluster) -> None:
    ok = cluster.submit("ok")
    bad = cluster.submit("bad", exit=3)
    stuck = cluster.submit("stuck", wait_for=cluster.root / "never")
    after_bad = cluster.submit("after_bad", after=(bad,))  # kill_on_invalid_dep: cancelled when bad fails
    handles = [ok, bad, stuck, after_bad]

    poll_until(cluster.backend, [stuck], lambda s: s[stuck.ref] == State.RUNNING, 60)
    stuck.cancel()
    states = poll_until(cluster.backend, handles, lambda s: all(v.ended for v in s.values()), 60)
    expected = {ok.ref: State.COMPLETED, bad.ref: State.FAILED, stuck.ref: State.CANCELLED,
                after_bad.ref: State.CANCELLED}
    assert states == expected
    assert "tinyjob ok started" in ok.logs() and "exited with status 3" in bad.logs()

    # `filipctl status` / `cancel` in another process: a new backend, the handles rebuilt from their refs.
    fresh = SlurmBackend(cluster.profile)
    again = [fresh.attach(h.ref) for h in handles]
    assert [(h.label, h.folder) for h in again] == [(h.label, h.folder) for h in handles]
    assert fresh.poll(again) == expected and fresh.sacct.calls == 1
    assert again[1].state() == State.FAILED and fresh.sacct.calls == 1  # ended: answered without sacct
    print(f"{cluster.backend.sacct.calls} sacct calls for {len(handles)} jobs, polled every 20 ms until all ended")


@pytest.mark.slow
def test_two_distributed_jobs_at_once_rendezvous_on_their_first_node_each_at_its_own_port(cluster: Cluster) -> None:
    # Both jobs on both nodes (2 nodes x 1 task each), their groups alive at the same time: a port taken from the
    # login host or a fixed one would collide, or send a rank to the wrong group.
    profile = SlurmProfile(nodes=2, tasks_per_node=1, cpus_per_task=1, time_min=5, setup=cluster.profile.setup)
    backend = SlurmBackend(profile, poll_interval_s=(MIN_S, MAX_S))
    dirs = [cluster.root / "stages" / name for name in ("dist_a", "dist_b")]
    plan = {"started": [str(d / f"started{r}") for d in dirs for r in (0, 1)],
            "reduced": [str(d / f"rank{r}.json") for d in dirs for r in (0, 1)]}
    handles = []
    for d in dirs:
        d.mkdir(parents=True)
        (d / "plan.json").write_text(json.dumps(plan))
        handles.append(backend.submit(JobRequest(Stage(d.name, "distjob", processes=2, distributed=True), RunDir(d))))
        cluster.submitted.append(handles[-1])
    states = poll_until(backend, handles, lambda s: all(v.ended for v in s.values()), 240)
    assert set(states.values()) == {State.COMPLETED}, [h.logs()[-3000:] for h in handles]

    address = {node: socket.gethostbyname(node) for node in ("filip-n1", "filip-n2")}
    ports = []
    for handle, d in zip(handles, dirs):
        ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["host"] for r in ranks] == ["filip-n1", "filip-n2"]  # one rank per node, in node order
        assert sacct(handle.label)["nodes"] == "filip-n[1-2]"
        # The rendezvous is the first node of the job's allocation, at the port of the job's id.
        rendezvous = f"filip-n1:{port_from_job_id(handle.label)}"
        assert {r["rendezvous"] for r in ranks} == {rendezvous} and [r["sum"] for r in ranks] == [3.0, 3.0]
        ports.append(rendezvous)
        # gloo ran over the bridge: each rank talked to the other node's address (the only way between the nodes).
        assert address["filip-n2"] in ranks[0]["peers"] and address["filip-n1"] in ranks[1]["peers"], ranks
    assert ports[0] != ports[1]
    print(f"two 2-node jobs at once: rendezvous {ports[0]} and {ports[1]}; gloo between {sorted(address.values())}")
