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
from typing import ClassVar
from urllib.parse import urlparse

from filipctl.backends.base import JobRequest
from filipctl.backends.local import LocalBackend
from filipctl.contract import worker_args
from filipctl.errors import FilipctlError
from filipctl.schema import RayProfile

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


def missing_resources(profile: RayProfile, available: dict[str, float]) -> str | None:
    """None if the cluster can hold every worker at once, else what is short."""
    need = {k: v * profile.workers for k, v in profile.resources_per_worker.items()}
    if profile.use_gpu and "GPU" not in need:  # Ray Train's default: one GPU per worker
        need["GPU"] = float(profile.workers)
    short = {k: (v, available.get(k, 0.0)) for k, v in need.items() if v > available.get(k, 0.0)}
    if not short:
        return None
    what = ", ".join(f"{k}: needs {v:g}, has {have:g}" for k, (v, have) in short.items())
    each = dict(profile.resources_per_worker)
    if profile.use_gpu:
        each.setdefault("GPU", 1.0)
    return f"{profile.workers} workers x {each} do not fit the Ray cluster ({what})"


class RayBackend(LocalBackend):
    name: ClassVar[str] = "ray"
    native_dependencies: ClassVar[bool] = False
    stop_grace_s: ClassVar[float] = 30.0  # ray.shutdown tears down the worker group first

    def __init__(self, profile: RayProfile | None = None) -> None:
        self.profile = profile or RayProfile()
        super().__init__(self.profile.max_parallel)
        self._resources: dict[str, float] | None = None  # the remote cluster's, asked once per run

    def capacity(self) -> tuple[int | None, int | None]:
        return self.profile.max_parallel, None  # Ray places the workers itself

    def _argv(self, request: JobRequest, port: int) -> list[str]:
        if self.profile.address == "local" and not request.stage.distributed:
            # A private Ray would run on this same machine: skip its start-up for one-process stages.
            return super()._argv(request, port)
        return [sys.executable, "-m", DRIVER, "--stage", request.stage.name, *worker_args(request.run_dir)]

    def validate(self, request: JobRequest) -> None:
        p = self.profile
        problem = probe_address(p.address, min(p.connect_timeout_s, 10.0))
        if problem:
            raise FilipctlError(f"Ray address {p.address}: {problem}. Start the cluster (ray start --head) "
                                f"or fix cluster.ray.address")
        if request.stage.distributed:
            problem = missing_resources(p, self._cluster_resources())
            if problem:  # Ray would otherwise wait for them forever
                raise FilipctlError(f"{problem}; lower cluster.ray.workers or resources_per_worker")

    def _cluster_resources(self) -> dict[str, float]:
        p = self.profile
        if p.address == "local":  # the private Ray this run would start: its size is known already
            return {"CPU": float(p.num_cpus or os.cpu_count() or 1), "GPU": 0.0}
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

    def _ask_to_stop(self, pid: int) -> None:
        # SIGTERM to the driver alone: it leaves through ray.shutdown, which stops its Ray Train run.
        # Signalling the whole group would hit a private Ray's raylet too, before the driver.
        os.kill(pid, signal.SIGTERM)
