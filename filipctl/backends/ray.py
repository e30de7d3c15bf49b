"""Ray backend: each stage runs under a small driver process (ray_driver.py beside this file) that joins a Ray cluster.

Pretraining becomes a Ray Train TorchTrainer (one worker per device, DeepSpeed inside each
worker); data and eval run as Ray tasks on a remote cluster, and as plain processes when the
"cluster" is a private Ray on this machine (address: local). The driver is managed like a local job (its pid and
log live in the run folder), so status, logs and cancel work exactly as for local runs;
cancelling the driver ends its Ray Train run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import ClassVar
from urllib.parse import urlparse

from filipctl.backends import ray_jobs
from filipctl.backends.base import JobHandle, JobRequest
from filipctl.backends.local import LocalBackend
from filipctl.backends.ray_placement import describe_nodes, placeable, unplaceable
from filipctl.contract import worker_args
from filipctl.errors import CannotRun, FilipctlError
from filipctl.schema import RayProfile
from filipctl.states import State

DRIVER = "filipctl.backends.ray_driver"  # the driver process of a stage (imports ray; the CLI never does)


def probe_address(address: str, timeout_s: float) -> str | None:
    """None if something answers at a HOST:PORT or ray://HOST:PORT address, else why not."""
    if address in ("local", "auto"):
        return None
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if not url.hostname or not url.port:
        return f"expected HOST:PORT or ray://HOST:PORT, got {address!r}"
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers at {url.hostname}:{url.port} ({exc.strerror or exc})"


def worker_bundle(profile: RayProfile) -> dict[str, float]:
    """What each worker reserves: resources_per_worker, and one GPU when use_gpu (Ray Train's default)."""
    each = dict(profile.resources_per_worker)
    if profile.use_gpu:
        each.setdefault("GPU", 1.0)
    return each


def missing_resources(profile: RayProfile,
                      available: Mapping[str, float] | Sequence[Mapping[str, float]]) -> str | None:
    """None if the cluster can hold the workers at once (for a range MIN-MAX: MIN of them), else what is short.

    `available`: each node's total resources (what `ray_driver --probe` prints), or one mapping for a one-node
    cluster. The totals first, then the workers' bundles on each node under `placement_strategy`."""
    nodes = [available] if isinstance(available, Mapping) else list(available)
    each = worker_bundle(profile)
    low, high = profile.worker_range
    need = {k: v * low for k, v in each.items()}
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    short = {k: (v, total[k]) for k, v in need.items() if v > total[k]}
    # An elastic group needs room for its least: Ray Train starts it with as many as the nodes hold, up to MAX.
    workers = (f"{profile.workers} workers x {each} (at least {low})" if profile.elastic
               else f"{low} worker{'s' * (low != 1)} x {each}")
    # (For a range, the totals short: how many the nodes hold; placed node by node, `why` says it already.)
    held = f"; the nodes hold {placeable(each, high, nodes, profile.placement_strategy)}" if profile.elastic else ""
    if short:
        what = ", ".join(f"{k}: needs {v:g}, has {have:g}" for k, (v, have) in short.items())
        return f"{workers} do not fit the Ray cluster ({what}{held})"
    why = unplaceable(each, low, nodes, profile.placement_strategy)
    if why is None:
        return None
    return (f"{workers} cannot be placed on the Ray cluster's {len(nodes)} node{'s' * (len(nodes) != 1)} with "
            f"placement_strategy {profile.placement_strategy}: {why} "
            f"(nodes: {describe_nodes(nodes, list(each))})")


def placement_note(profile: RayProfile, available: Mapping[str, float] | Sequence[Mapping[str, float]]) -> str:
    """For an elastic group the cluster can start: how many workers of its range the nodes hold now ("" otherwise)."""
    if not profile.elastic:
        return ""
    nodes = [available] if isinstance(available, Mapping) else list(available)
    low, high = profile.worker_range
    n = placeable(worker_bundle(profile), high, nodes, profile.placement_strategy)
    later = "" if n >= high else f" (more join when the nodes hold them: checked every {profile.resize_interval_s:g} s)"
    nodes_hold = f"{len(nodes)} nodes hold" if len(nodes) != 1 else "1 node holds"
    return f"workers {profile.workers}: the Ray cluster's {nodes_hold} {n}{later}"


class RayBackend(LocalBackend):
    name: ClassVar[str] = "ray"
    native_dependencies: ClassVar[bool] = False
    stop_grace_s: ClassVar[float] = 30.0  # ray.shutdown tears down the worker group first

    def __init__(self, profile: RayProfile | None = None) -> None:
        self.profile = profile or RayProfile()
        super().__init__(self.profile.max_parallel)
        self._resources: dict[str, float] | list[dict[str, float]] | None = None  # the cluster's, asked once per run
        self._stopped: set[tuple[str, str]] = set()  # Ray jobs (Jobs API address, id) this backend stopped

    def capacity(self) -> tuple[int | None, int | None]:
        # Ray places the workers itself. Driven from here, one stage at a time unless told: a private Ray starts once
        # per driver. (A graph run through the Jobs API counts the nodes' room instead: ray_in_job.)
        return self.profile.max_parallel or 1, None

    def _argv(self, request: JobRequest, port: int) -> list[str]:
        if self.profile.address == "local" and not request.stage.distributed:
            # A private Ray would run on this same machine: skip its start-up for one-process stages.
            return super()._argv(request, port)
        return [sys.executable, "-m", DRIVER, "--stage", request.stage.name, *worker_args(request.run_dir)]

    def validate(self, request: JobRequest) -> None:
        p = self.profile
        if ray_jobs.is_jobs_address(p.address):
            problem = ray_jobs.check_address(p.address, min(p.connect_timeout_s, 10.0))
            if problem:
                raise CannotRun(f"Ray Jobs API {p.address}: {problem}. Start the cluster (ray start --head "
                                "--dashboard-host=...) or fix cluster.ray.address")
        else:
            problem = probe_address(p.address, min(p.connect_timeout_s, 10.0))
            if problem:
                raise CannotRun(f"Ray address {p.address}: {problem}. Start the cluster (ray start --head) "
                                f"or fix cluster.ray.address")
        if request.stage.distributed:
            problem = missing_resources(p, self._cluster_resources())
            if problem:  # Ray would otherwise wait for them forever
                raise CannotRun(f"{problem}; lower cluster.ray.workers or resources_per_worker")

    def cluster_nodes(self) -> list[dict[str, float]]:
        """Each live node's total resources (asked once per run)."""
        found = self._cluster_resources()
        return [found] if isinstance(found, dict) else list(found)

    def _cluster_resources(self) -> dict[str, float] | list[dict[str, float]]:
        p = self.profile
        if p.address == "local":  # the private Ray this run would start: its size is known already
            return {"CPU": float(p.num_cpus or os.cpu_count() or 1), "GPU": 0.0}
        if self._resources is None and ray_jobs.is_jobs_address(p.address):
            # The Jobs API's address is the dashboard's: its state API lists the nodes over HTTP, no ray.init here.
            self._resources = ray_jobs.node_resources(p.address, p.connect_timeout_s)
        if self._resources is None:
            # Join from a child process, bounded in time: the CLI itself never imports ray.
            argv = [sys.executable, "-m", DRIVER, "--probe", p.address, "--timeout", str(p.connect_timeout_s)]
            try:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=p.connect_timeout_s + 60)
            except subprocess.TimeoutExpired:
                raise FilipctlError(f"Ray address {p.address}: no answer from the cluster within "
                                    f"{p.connect_timeout_s + 60:g} s; check it with `ray status`") from None
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
                raise FilipctlError(why if why.startswith("Ray address") else f"Ray address {p.address}: {why}")
            self._resources = json.loads(res.stdout.strip().splitlines()[-1])
        return self._resources

    def describe(self, request: JobRequest) -> str:
        command = super().describe(request)
        if ray_jobs.is_jobs_address(self.profile.address):
            return f"on the head, inside the graph's one Ray job at {self.profile.address}: {command}"
        return command

    def submit(self, request: JobRequest) -> JobHandle:
        if ray_jobs.is_jobs_address(self.profile.address):
            # Its driver would join the cluster from here; with a Jobs API address the graph runs on the cluster.
            raise CannotRun(f"cluster.ray.address {self.profile.address} is a Ray Jobs API: `filipctl run` and "
                            "`filipctl ablate` submit their whole graph there as one Ray job; this command cannot "
                            "yet; give it the cluster's GCS address (HOST:6379) from a node of the cluster")
        return super().submit(request)

    # A stage of a graph that runs as a Ray job (ray_jobs.StageRef): its liveness is the Ray job's, asked over HTTP.

    def attach(self, ref: str) -> JobHandle:
        if ray_jobs.StageRef.matches(ref):
            return JobHandle(self, ref, ray_jobs.StageRef.parse(ref).job_id, ray_jobs.StageRef.parse(ref).folder)
        return super().attach(ref)

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        in_jobs = [h.ref for h in handles if ray_jobs.StageRef.matches(h.ref)]
        states = ray_jobs.poll(in_jobs) if in_jobs else {}
        return {**super().poll([h for h in handles if h.ref not in states]), **states}

    def cancel(self, handle: JobHandle) -> None:
        if not ray_jobs.StageRef.matches(handle.ref):
            return super().cancel(handle)
        ref = ray_jobs.StageRef.parse(handle.ref)
        if (ref.address, ref.job_id) not in self._stopped:  # one stop for the graph's every stage
            self._stopped.add((ref.address, ref.job_id))
            ray_jobs.stop(ref.address, ref.job_id)

    def logs(self, handle: JobHandle) -> str:
        if ray_jobs.StageRef.matches(handle.ref):
            return ray_jobs.stage_logs(ray_jobs.StageRef.parse(handle.ref))
        return super().logs(handle)

    def _ask_to_stop(self, pid: int) -> None:
        # SIGTERM to the driver alone: it leaves through ray.shutdown, which stops its Ray Train run.
        # Signalling the whole group would hit a private Ray's raylet too, before the driver.
        os.kill(pid, signal.SIGTERM)
