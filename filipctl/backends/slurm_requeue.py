"""Why Slurm requeued a job, from Slurm's accounting: how its run before ended and which nodes went down meanwhile
("the run before ended NODE_FAIL: filip-n2 down from 09:13:34, Not responding"). Asked by the requeued job itself,
so that its stage's run says it whether or not a CLI was following (`--detach`), and by the CLI's watcher when it
sees a running job queued again."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Incarnation:
    state: str
    start: str
    end: str
    nodes: str


@dataclass(frozen=True)
class NodeEvent:
    node: str
    start: str
    end: str
    state: str
    reason: str


def incarnations(sacct_out: str) -> list[Incarnation]:
    """`sacct -D -X -P -n -o State,Start,End,NodeList` -> every incarnation of the job, oldest first."""
    found = []
    for line in sacct_out.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            found.append(Incarnation(parts[0].split(" ")[0], *parts[1:]))
    return found


def node_events(sacctmgr_out: str) -> list[NodeEvent]:
    """`sacctmgr -n -P show event ... Format=NodeName,TimeStart,TimeEnd,State,Reason` -> the node events."""
    return [NodeEvent(*line.split("|", 4)) for line in sacctmgr_out.splitlines() if line.count("|") >= 4]


def describe(before: Incarnation, events: list[NodeEvent]) -> str:
    """One clause: how the incarnation before this one ended, and the nodes that went down meanwhile."""
    what = f"the run before ended {before.state}"
    if events:
        what += ": " + "; ".join(f"{e.node} {e.state.rstrip('*').lower()} from {e.start.partition('T')[2] or e.start}"
                                 + (f", {e.reason}" if e.reason else "") for e in events)
    return what


def _run(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""


def slurm_requeue_cause(job_id: str) -> str:
    """Why this Slurm job runs again, or "" when accounting cannot say (no sacct on the node, slurmdbd busy)."""
    runs = incarnations(_run(["sacct", "-D", "-X", "-P", "-n", "-o", "State,Start,End,NodeList", "-j", job_id]))
    # The last one that ended (slurmdbd may not have recorded this one, running, yet).
    ended = [r for r in runs if r.state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "REQUEUED")]
    if not job_id or not ended:
        return ""
    before = ended[-1]
    events = node_events(_run(["sacctmgr", "-n", "-P", "show", "event", f"Nodes={before.nodes}",
                               f"Start={before.start}", "End=now", "Format=NodeName,TimeStart,TimeEnd,State,Reason"]))
    return describe(before, events)
