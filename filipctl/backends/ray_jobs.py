"""A Ray cluster's Jobs API (cluster.ray.address: http://HEAD:8265, Ray's own address for `ray job submit`).

With such an address the whole stage graph of a `filipctl run` or `ablate` is submitted as ONE Ray job
(filipctl/orchestration/graph_job.py): its entrypoint runs filipctl's graph runner on the cluster's head, whose
stage drivers join the cluster they run in. The submitting machine only speaks HTTP to the head's dashboard port
(Ray's JobSubmissionClient and state API); it never calls ray.init, whose processes bind every interface.

Every stage of such a graph is recorded (state index, MLflow tag filipctl.job_id) under a ref that names its Ray
job, `rayjob|<Jobs API address>|<Ray job id>|<the stage's job record>`, so that `filipctl status`, `logs` and
`cancel` work from any machine that reaches the head: whether a stage still lives is the Ray job's status (the
pids in its job record are the head's), how it ended is its job record on the shared output_dir.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from filipctl.backends.local import _state_of
from filipctl.contract import RunDir
from filipctl.errors import CannotRun, FilipctlError
from filipctl.states import State

if TYPE_CHECKING:
    from filipctl.schema import RayProfile

REF_PREFIX = "rayjob|"
ALIVE = ("PENDING", "RUNNING")  # Ray's JobStatus values of a job that has not ended
STOP_WAIT_S = 60.0  # how long `filipctl cancel` waits for Ray to stop a job (its entrypoint gets 3 s, then SIGKILL)


def is_jobs_address(address: str) -> bool:
    """Whether cluster.ray.address names a cluster's Jobs API (the graph is submitted as a Ray job)."""
    return address.startswith(("http://", "https://"))


def check_address(address: str, timeout_s: float) -> str | None:
    """None when a Ray dashboard (Jobs API) answers at `address`, else why not (one clause). Plain HTTP, bounded in
    time: Ray's own client waits for the operating system's connect timeout (minutes) on an address that drops."""
    url = urlparse(address)
    if not url.hostname:
        return f"expected http://HOST:PORT (the head's dashboard, usually port 8265), got {address!r}"
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return f"expected http://HOST:PORT (the head's dashboard, usually port 8265), got {address!r}"
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        return f"nothing answers at {url.hostname}:{port} ({exc.strerror or exc})"
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout_s) as r:
            version = json.loads(r.read()).get("ray_version")
    except (urllib.error.URLError, OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
        # Not HTTP at all (a GCS port speaks gRPC), an HTTP error, or JSON without the version: not the Jobs API.
        why = getattr(exc, "reason", None) or type(exc).__name__
        return f"{url.hostname}:{port} answers, but not as a Ray dashboard ({why}); the Jobs API is the dashboard's " \
               "port (8265 by default), not the GCS's (6379)"
    return None if version else f"{url.hostname}:{port} answers, but not as a Ray dashboard (no ray_version)"


def client(address: str):
    """Ray's Jobs API client (plain HTTP; imports ray, never starts or joins it)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def node_resources(address: str, timeout_s: float) -> list[dict[str, float]]:
    """The total resources of each live node (Ray's state API over HTTP)."""
    from ray.util.state import list_nodes

    try:
        # Dead nodes stay listed for a while: the filter leaves them out (not "missing output").
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                           timeout=max(1, int(timeout_s)), raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - the state API raises plain exceptions for an unhealthy cluster
        raise CannotRun(f"Ray Jobs API {address}: the cluster does not list its nodes "
                        f"({' '.join(str(exc).split())[:300]}); check it with `ray status`") from None
    return [dict(n.resources_total or {}) for n in nodes]


def worker_slots(profile: "RayProfile", nodes: list[dict[str, float]]) -> int:
    """How many training workers (one `resources_per_worker` bundle each) the nodes hold at once: the executor's room
    in worker processes, so that independent trainers start together while they fit and queue when they do not."""
    from filipctl.backends.ray_placement import workers_on_node

    each = dict(profile.resources_per_worker)
    if profile.use_gpu:
        each.setdefault("GPU", 1.0)
    return max(1, sum(workers_on_node(each, node, 1 << 20) for node in nodes))


# -- a stage of a graph that runs as a Ray job ---------------------------------------------------------------------

@dataclass(frozen=True)
class StageRef:
    address: str  # the Jobs API address (http://HEAD:8265)
    job_id: str  # the Ray job's submission id
    record: Path  # <stage folder>/logs/<stage>.job.json, written on the head when the graph runner starts the stage

    @staticmethod
    def matches(ref: str) -> bool:
        return ref.startswith(REF_PREFIX)

    @classmethod
    def parse(cls, ref: str) -> "StageRef":
        address, job_id, record = ref.removeprefix(REF_PREFIX).split("|", 2)
        return cls(address, job_id, Path(record))

    def __str__(self) -> str:
        return f"{REF_PREFIX}{self.address}|{self.job_id}|{self.record}"

    @property
    def folder(self) -> Path:
        return self.record.parent.parent

    def started_here(self) -> dict[str, Any] | None:
        """Its job record, when this Ray job started it (a record left by an earlier attempt is not its)."""
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("ray_job") == self.job_id else None


def stage_state(ref: StageRef, job_status: str) -> State:
    """A stage's state from its Ray job's status and its own job record (the shared output_dir)."""
    if not ref.folder.is_dir():
        # This machine does not see the run folder: the Ray job's state is all it knows, and never the end of a stage.
        return State.RUNNING if job_status in ALIVE else State.UNKNOWN
    record = ref.started_here()
    if record is not None and "exit_code" in record:
        return _state_of(record["exit_code"], record.get("cancelled", False))
    if job_status in ALIVE:
        return State.RUNNING if record is not None else State.QUEUED  # not started yet: the graph runner holds it
    # The Ray job ended and the stage with it, unrecorded (its runner was stopped or died).
    if record is not None and RunDir(ref.folder).result.is_file():
        return State.COMPLETED
    return State.CANCELLED if job_status == "STOPPED" else State.FAILED


def job_statuses(address: str, job_ids: set[str]) -> dict[str, str]:
    """Each Ray job's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED; UNKNOWN for a job the cluster does not
    know, e.g. after it restarted): one HTTP call per job."""
    jobs = reach(address)
    out = {}
    for job_id in job_ids:
        try:
            out[job_id] = str(jobs.get_job_status(job_id))
        except RuntimeError as exc:
            if not _no_such_job(exc):  # a 500 or 503 says nothing about the job: no state is made up from it
                raise FilipctlError(f"Ray Jobs API {address}: no answer about Ray job {job_id} ({_first_line(exc)})") \
                    from None
            out[job_id] = "UNKNOWN"
        except Exception as exc:  # noqa: BLE001 - the connection broke mid-way
            raise FilipctlError(f"Ray Jobs API {address}: no answer about Ray job {job_id} ({type(exc).__name__})") \
                from None
    return out


def reach(address: str):
    """The Jobs API client of a cluster that answers now (FilipctlError, in seconds, if it does not)."""
    problem = check_address(address, 10.0)
    if problem:
        raise FilipctlError(f"Ray Jobs API {address}: {problem}")
    return client(address)


def poll(refs: list[str]) -> dict[str, State]:
    parsed = {ref: StageRef.parse(ref) for ref in refs}
    by_address: dict[str, set[str]] = {}
    for r in parsed.values():
        by_address.setdefault(r.address, set()).add(r.job_id)
    statuses = {(a, j): s for a, ids in by_address.items() for j, s in job_statuses(a, ids).items()}
    return {ref: stage_state(r, statuses[(r.address, r.job_id)]) for ref, r in parsed.items()}


def stop(address: str, job_id: str, wait_s: float = STOP_WAIT_S) -> str:
    """Stop a Ray job (its graph runner, every stage driver, and with them their trainers and placement groups) and
    wait until Ray says it ended -> its final status."""
    jobs = reach(address)
    try:
        jobs.stop_job(job_id)
        deadline = time.time() + wait_s
        status = str(jobs.get_job_status(job_id))
        while status in ALIVE and time.time() < deadline:
            time.sleep(0.5)
            status = str(jobs.get_job_status(job_id))
    except RuntimeError as exc:
        if _no_such_job(exc):  # a job the cluster does not know (it restarted): nothing left to stop
            return "UNKNOWN"
        raise FilipctlError(f"Ray Jobs API {address}: could not stop Ray job {job_id} ({_first_line(exc)}); "
                            "try again, or `ray job stop` on the head") from None
    except Exception as exc:  # noqa: BLE001 - the connection broke mid-way
        raise FilipctlError(f"Ray Jobs API {address}: no answer while stopping Ray job {job_id} "
                            f"({type(exc).__name__}); check it with `ray job status {job_id}`") from None
    if status in ALIVE:
        raise FilipctlError(f"Ray job {job_id} still {status} {wait_s:g} s after it was asked to stop; check it with "
                            f"`ray job status {job_id}` on the head")
    return status


def _no_such_job(exc: Exception) -> bool:
    """JobSubmissionClient raises RuntimeError for every non-200 answer: only a 404 says the job is unknown."""
    text = str(exc)
    return "does not exist" in text or "404" in text


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def stage_logs(ref: StageRef) -> str:
    """The stage's own log where this machine sees the output_dir; elsewhere the Ray job's (the graph runner's
    lines: each stage's progress and how it ended)."""
    if ref.folder.is_dir():
        record = ref.started_here()
        log = Path(record.get("log", "")) if record else None
        return log.read_text(errors="replace") if log and log.is_file() else ""  # not started (yet): no log
    try:
        return client(ref.address).get_job_logs(ref.job_id)
    except Exception as exc:  # noqa: BLE001 - unreachable cluster, forgotten job: say so in place of the log
        return f"(no log: {ref.folder} is not visible here and Ray job {ref.job_id} gave none: {exc})"
