"""Slurm backend: each stage is a Slurm job submitted through submitit, chained with afterok.

A job's ref is self-describing, "<slurm id>@<submitit folder>", so any later process (`filipctl
status`, `filipctl cancel`) finds the job again from it without extra state. States come from
`SacctWatcher`: one batched sacct call per poll interval for every job this backend watches.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

from filipctl.backends.base import JobHandle, JobRequest
from filipctl.backends.slurm_requeue import slurm_requeue_cause
from filipctl.contract import worker_args
from filipctl.errors import FilipctlError
from filipctl.schema import SlurmProfile
from filipctl.states import State

log = logging.getLogger(__name__)

NOT_A_LOGIN_NODE = ("srun/sbatch not found: this machine is not a Slurm login node (`--dry-run` shows the "
                    "plan anywhere; bring up a test cluster with scripts/slurm-up.sh)")

# sacct states -> ours. REQUEUED/PREEMPTED/TIMEOUT are transient when submitit requeues the job.
_STATES = {
    "PENDING": State.QUEUED, "REQUEUED": State.QUEUED, "REQUEUE_HOLD": State.QUEUED,
    "REQUEUE_FED": State.QUEUED, "CONFIGURING": State.QUEUED, "RESIZING": State.RUNNING,
    "RUNNING": State.RUNNING, "COMPLETING": State.RUNNING, "SUSPENDED": State.RUNNING,
    "STAGE_OUT": State.RUNNING, "SIGNALING": State.RUNNING, "PREEMPTED": State.QUEUED,
    "TIMEOUT": State.QUEUED, "COMPLETED": State.COMPLETED, "FAILED": State.FAILED,
    "NODE_FAIL": State.FAILED, "OUT_OF_MEMORY": State.FAILED, "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.FAILED, "CANCELLED": State.CANCELLED, "REVOKED": State.CANCELLED,
}


def _down_nodes(nodes: str) -> str:
    """Which of `nodes` (a Slurm node list) are down or not responding, by sinfo; all of them if it cannot tell."""
    try:
        res = subprocess.run(["sinfo", "--noheader", "--dead", "--Node", "--format=%N", "--nodes=" + nodes],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return nodes
    return ",".join(sorted(set(res.stdout.split()))) or nodes


def _parse_ref(ref: str) -> tuple[str, Path]:
    """(Slurm job id, submitit folder) of a ref "<slurm id>@<submitit folder>": the one place that reads refs."""
    slurm_id, at, folder = ref.partition("@")
    if not (slurm_id and at):  # the folder may be empty: planning's stand-ins for jobs not submitted yet
        raise FilipctlError(f"{ref!r} is not a Slurm job reference (expected <slurm id>@<submitit folder>)")
    return slurm_id, Path(folder)


class SacctWatcher:
    """The states of many Slurm jobs from one `sacct` call per interval, backing off while nothing changes.

    Every job ever asked about is watched until it ends; a call asks sacct about all of them at once.
    Between calls, answers come from the last result. The interval doubles after each call that saw
    no change (min_s, 2 min_s, ... up to max_s) and drops back to min_s when a state changed or a new
    job came in. submitit's SlurmInfoWatcher batches the same way, but paces its calls by the time
    since the last submission (never under 2 s) and takes TIMEOUT, SUSPENDED or CONFIGURING for
    final, which a requeued or resumed job is not: hence this small equivalent.

    NODE_FAIL is what sacct says of a job that lost a node until its next start, also when Slurm requeued it
    (filipctl submits with --requeue): squeue tells which it is, for the few jobs that read NODE_FAIL.
    """

    def __init__(self, min_s: float = 0.5, max_s: float = 10.0) -> None:
        self.min_s, self.max_s = min_s, max_s
        self.interval_s = min_s
        self.calls = 0  # sacct invocations, for tests and diagnostics
        self._states: dict[str, State] = {}  # what the last calls said, by Slurm id
        self._asked: set[str] = set()  # ids some call included: the others force the next call
        self._next_call = 0.0  # time.monotonic() from which a poll calls sacct again
        self._requeued: set[str] = set()  # jobs requeued after a node failure, said once each
        self._lock = threading.Lock()  # handles may be polled from several threads (the executor, Ctrl-C)

    def states(self, slurm_ids: list[str]) -> dict[str, State]:
        with self._lock:
            watched = {*self._asked, *slurm_ids}
            active = sorted(j for j in watched if not self._states.get(j, State.QUEUED).ended)
            new = any(j not in self._asked for j in slurm_ids)
            if active and (new or time.monotonic() >= self._next_call):
                self._call_sacct(active)
            # Never answered (sacct failed): the scheduler cannot say yet.
            return {j: self._states.get(j, State.UNKNOWN) for j in slurm_ids}

    def hurry(self) -> None:
        """A change is coming (a cancel): ask at the next poll, then at the shortest interval."""
        with self._lock:
            self.interval_s, self._next_call = self.min_s, 0.0

    def _call_sacct(self, slurm_ids: list[str]) -> None:
        self.calls += 1
        new = [j for j in slurm_ids if j not in self._asked]
        self._asked.update(slurm_ids)
        before = {j: self._states.get(j) for j in slurm_ids}
        cmd = ["sacct", "--noheader", "--allocations", "--parsable2", "--format=JobID,State,NodeList",
               "--jobs=" + ",".join(slurm_ids)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise FilipctlError(NOT_A_LOGIN_NODE) from None
        except subprocess.TimeoutExpired:
            res = None
        if res is not None and res.returncode == 0:
            node_failed: dict[str, str] = {}  # id -> the nodes it ran on
            for line in res.stdout.splitlines():
                slurm_id, word, nodes = (line.split("|") + ["", ""])[:3]
                if slurm_id in before:
                    self._states[slurm_id] = _STATES.get(word.split(" ")[0], State.UNKNOWN)
                    if word.startswith("NODE_FAIL"):
                        node_failed[slurm_id] = nodes
                    elif before[slurm_id] is State.RUNNING and self._states[slurm_id] is State.QUEUED:
                        self._queued_again(slurm_id)
            # Started again: a later loss is said again.
            self._requeued.difference_update(j for j in slurm_ids if self._states.get(j) is State.RUNNING)
            if node_failed:
                self._node_failed(node_failed)
            for slurm_id in new:
                # sacct can lag behind a fresh submission: unknown means not started yet.
                self._states.setdefault(slurm_id, State.QUEUED)
        else:  # keep the last answers, and back off: a struggling slurmdbd needs fewer calls, not more
            log.warning("sacct failed (%s); job states may be stale",
                        "timed out" if res is None else (res.stderr.strip() or f"exit {res.returncode}"))
        changed = res is not None and res.returncode == 0 and any(self._states.get(j) != s for j, s in before.items())
        self.interval_s = self.min_s if changed else min(self.interval_s * 2, self.max_s)
        self._next_call = time.monotonic() + self.interval_s

    def _queued_again(self, slurm_id: str) -> None:
        """A running job that sacct now reads pending: Slurm requeued it (a lost node whose NODE_FAIL this watcher did
        not see between two calls, a time limit, a preemption). Say why, from Slurm's accounting."""
        if slurm_id in self._requeued:
            return
        self._requeued.add(slurm_id)
        cause = slurm_requeue_cause(slurm_id)
        log.warning("Slurm job %s was requeued%s: it continues from its last checkpoint when it starts again",
                    slurm_id, f" ({cause})" if cause else "")

    def _node_failed(self, jobs: dict[str, str]) -> None:
        """Jobs that sacct reads NODE_FAIL: queued again when Slurm requeued them (squeue holds them), else failed.
        Either way the log names the nodes of the job that are down."""
        unsure = {j: "PENDING" for j in jobs}  # cannot tell yet: not failed on a guess, asked again next poll
        try:
            res = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T", "--jobs=" + ",".join(jobs)],
                                 capture_output=True, text=True, timeout=30)
        except (subprocess.TimeoutExpired, OSError):
            res = None
        if res is not None and res.returncode == 0:
            queued = dict(ln.split("|", 1) for ln in res.stdout.split() if "|" in ln)
        elif res is not None and "Invalid job id" in res.stderr:
            queued = {}  # squeue no longer holds any of them: they ended for good
        else:  # a busy slurmctld (as when a node just died) answers nothing: ask again at the next poll
            queued = unsure
        for slurm_id, nodes in jobs.items():
            state = _STATES.get(queued.get(slurm_id, "NODE_FAIL"), State.UNKNOWN)
            self._states[slurm_id] = state
            if state is State.FAILED:
                log.warning("Slurm job %s failed: node %s lost (NODE_FAIL)", slurm_id, _down_nodes(nodes))
            elif slurm_id not in self._requeued:
                self._requeued.add(slurm_id)
                log.warning("Slurm job %s lost node %s (NODE_FAIL) and was requeued: it continues from its last "
                            "checkpoint when the nodes it needs are up", slurm_id, _down_nodes(nodes))


def node_range_parameters(p: SlurmProfile) -> tuple[dict[str, object], dict[str, object]]:
    """submitit's parameters and the extra sbatch options of a pretraining job on a range of nodes (nodes: MIN-MAX).

    sbatch turns --ntasks-per-node into --ntasks=MIN x tasks_per_node at submission (Slurm 22.05), and Slurm then
    allocates MIN nodes however many are free. So the allocation asks for nodes alone (--nodes=MIN-MAX: as many as
    are free, up to MAX), each with room for its tasks (--mincpus), and srun starts tasks_per_node tasks on every
    node it got. submitit is told MIN nodes of one task (its Job object counts those; filipctl never waits on its
    per-task results, and the sbatch line is the range)."""
    low, high = p.node_range
    cpus = p.cpus_per_task or 1
    srun = [f"--ntasks-per-node={p.tasks_per_node}"]
    if p.cpus_per_task:  # srun 22.05 does not take it from the allocation
        srun.append(f"--cpus-per-task={p.cpus_per_task}")
    sbatch: dict[str, object] = {"nodes": f"{low}-{high}"}
    if p.tasks_per_node > 1:
        sbatch["mincpus"] = p.tasks_per_node * cpus
    return {"nodes": low, "srun_args": srun}, sbatch


class SlurmBackend:
    name: ClassVar[str] = "slurm"
    native_dependencies: ClassVar[bool] = True

    def __init__(self, profile: SlurmProfile | None = None, poll_interval_s: tuple[float, float] = (0.5, 10.0)) -> None:
        self.profile = profile or SlurmProfile()
        self.sacct = SacctWatcher(*poll_interval_s)  # (shortest, longest) interval between sacct calls

    def capacity(self) -> tuple[int | None, int | None]:
        # Slurm places the workers itself: only the number of jobs queued at once is ours to limit.
        return self.profile.max_parallel, None

    # -- submission -----------------------------------------------------------------------------

    def _executor(self, request: JobRequest, planning: bool = False):
        import submitit

        executor_cls = submitit.SlurmExecutor
        if shutil.which("srun") is None:  # submitit refuses to start off a Slurm node
            if not planning:
                raise FilipctlError(NOT_A_LOGIN_NODE)
            # --dry-run only writes the scripts: it works on a laptop too.
            executor_cls = type("PlanningExecutor", (submitit.SlurmExecutor,), {"affinity": classmethod(lambda cls: 1)})
        p = self.profile
        stage = request.stage
        folder = request.run_dir.slurm
        ex = executor_cls(folder=folder, max_num_timeout=p.max_requeues)
        extra: dict[str, object] = {"requeue": True, **p.sbatch}
        if request.after:
            extra["dependency"] = "afterok:" + ":".join(_parse_ref(h.ref)[0] for h in request.after)
            # A failed dependency cancels this job instead of leaving it pending forever.
            extra["kill_on_invalid_dep"] = "yes"
        params: dict[str, object] = dict(
            job_name=f"filip-{stage.name}", time=p.time_min, signal_delay_s=p.signal_delay_s,
            partition=p.partition, account=p.account, qos=p.qos, constraint=p.constraint,
            setup=list(p.setup), additional_parameters=extra,
        )
        if stage.distributed:
            if p.elastic:
                shape, sbatch_only = node_range_parameters(p)
                params.update(shape)
                extra.update(sbatch_only)
            else:
                params.update(nodes=p.nodes, ntasks_per_node=p.tasks_per_node)
            if p.gpus_per_node:
                params["gpus_per_node"] = p.gpus_per_node
        else:  # data and eval: one task on one node (one GPU when the site has them)
            params.update(nodes=1, ntasks_per_node=1)
            if p.gpus_per_node:
                params["gpus_per_node"] = 1
        if p.cpus_per_task:
            params["cpus_per_task"] = p.cpus_per_task
        if p.mem_gb:
            params["mem"] = f"{int(p.mem_gb * 1024)}M"
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    @staticmethod
    def _job(request: JobRequest):
        from filipctl.backends.slurm_task import StageJob

        return StageJob(request.stage.module, worker_args(request.run_dir), dict(request.env), request.stage.distributed)

    def describe(self, request: JobRequest) -> str:
        """The sbatch script submitit would submit for this stage (for --dry-run)."""
        ex = self._executor(request, planning=True)
        return ex._make_submission_file_text(ex._submitit_command_str, "DRYRUN")

    def validate(self, request: JobRequest) -> None:
        """Ask the scheduler whether it could ever run this job (sbatch --test-only): nothing is queued."""
        script = self.describe(request)
        if request.after:  # --test-only rejects dependencies on jobs that do not exist yet
            script = "\n".join(ln for ln in script.splitlines() if "--dependency" not in ln and "kill-on-invalid" not in ln)
        with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
            f.write(script)
        try:
            res = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise FilipctlError(NOT_A_LOGIN_NODE) from None
        finally:
            Path(f.name).unlink(missing_ok=True)
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().replace("sbatch: error: ", "")
            raise FilipctlError(f"Slurm refused the {request.stage.name} job: {msg} "
                                f"(cluster profile: {self._summary(request)})")

    def _summary(self, request: JobRequest) -> str:
        p = self.profile
        if request.stage.distributed:
            return (f"partition={p.partition or 'default'} nodes={p.nodes} tasks_per_node={p.tasks_per_node} "
                    f"gpus_per_node={p.gpus_per_node} mem_gb={p.mem_gb}")
        return f"partition={p.partition or 'default'} nodes=1 tasks=1 mem_gb={p.mem_gb}"

    def submit(self, request: JobRequest) -> JobHandle:
        import submitit

        ex = self._executor(request)
        try:
            job = ex.submit(self._job(request))
        except submitit.core.utils.FailedJobError as exc:
            raise FilipctlError(f"Slurm refused the {request.stage.name} job: {exc}") from None
        return JobHandle(self, f"{job.job_id}@{ex.folder}", job.job_id, request.run_dir.root)

    def attach(self, ref: str) -> JobHandle:
        slurm_id, folder = _parse_ref(ref)
        return JobHandle(self, ref, slurm_id, folder.parent)  # submitit's folder is RunDir(stage folder).slurm

    # -- queries --------------------------------------------------------------------------------

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        ids = {h.ref: _parse_ref(h.ref)[0] for h in handles}
        states = self.sacct.states(list(ids.values()))
        return {ref: states[slurm_id] for ref, slurm_id in ids.items()}

    def cancel(self, handle: JobHandle) -> None:
        slurm_id, _ = _parse_ref(handle.ref)
        subprocess.run(["scancel", slurm_id], capture_output=True, text=True, timeout=30)
        self.sacct.hurry()  # whoever cancels waits to see it ended

    def logs(self, handle: JobHandle) -> str:
        slurm_id, folder = _parse_ref(handle.ref)
        parts = []
        for suffix in ("out", "err"):
            for path in sorted(folder.glob(f"{slurm_id}_*_log.{suffix}")):
                parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')}")
        return "\n".join(parts)
