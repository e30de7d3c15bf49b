"""The backend of the graph runner that runs as a Ray job on a cluster's head (filipctl/orchestration/graph_job.py).

Its stage drivers are its own child processes, watched by pid as the local backend watches its jobs, each joining
the cluster it runs on (ray_driver.py: address "auto"). Each stage is recorded under its Ray job's ref
(ray_jobs.StageRef) so that other machines ask Ray, not a pid of the head, whether it lives; its job record says
which Ray job started it and when it started and ended.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import ClassVar

from filipctl.backends.base import JobHandle, JobRequest
from filipctl.backends.local import LocalBackend
from filipctl.backends.ray import RayBackend
from filipctl.backends.ray_jobs import StageRef
from filipctl.contract import write_atomic
from filipctl.schema import RayProfile
from filipctl.states import State


class InJobBackend(RayBackend):
    name: ClassVar[str] = "ray"

    def __init__(self, profile: RayProfile, address: str, job_id: str, slots: int) -> None:
        super().__init__(profile)
        self.address, self.job_id, self.slots = address, job_id, slots
        self.stopping = False  # Ray is stopping the job: it signals every driver itself, and kills this one in 3 s

    def capacity(self) -> tuple[int | None, int | None]:
        return self.profile.max_parallel, self.slots  # independent stages at once, while their workers fit the nodes

    def validate(self, request: JobRequest) -> None:
        return None  # the submitting command checked the cluster

    def ref(self, request: JobRequest) -> str:
        return str(StageRef(self.address, self.job_id, request.run_dir.job_record(request.stage.name)))

    def submit(self, request: JobRequest) -> JobHandle:
        record = Path(LocalBackend.submit(self, request).ref)
        rec = json.loads(record.read_text())
        # Which Ray job started it (a record of an earlier attempt is not this job's), and since when.
        rec.update({"ray_job": self.job_id, "jobs_address": self.address, "started": rec["submitted"]})
        write_atomic(record, json.dumps(rec))  # other machines read it any time
        return JobHandle(self, self.ref(request), self.job_id, request.run_dir.root)

    def _finish(self, job_id: str, code: int) -> State:
        state = super()._finish(job_id, code)
        rec = self._record(job_id)
        rec["ended"] = time.time()  # with "started": when the stage ran (independent stages overlap)
        write_atomic(Path(job_id), json.dumps(rec))
        return state

    def _local(self, handle: JobHandle) -> JobHandle:
        """The handle as the local backend knows it: by its job record."""
        return JobHandle(self, str(StageRef.parse(handle.ref).record), handle.label, handle.folder)

    def attach(self, ref: str) -> JobHandle:
        return JobHandle(self, ref, self.job_id, StageRef.parse(ref).folder)

    def poll(self, handles: list[JobHandle]) -> dict[str, State]:
        return {h.ref: self._state(self._local(h).ref) for h in handles}

    def cancel(self, handle: JobHandle) -> None:
        local = self._local(handle)
        if not self.stopping:
            LocalBackend.cancel(self, local)
            return
        pid = self._mark_cancelled(local.ref)["pid"]
        try:  # Ray signals the driver as well; no waiting: SIGKILL comes 3 s after Ray's SIGTERM
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def logs(self, handle: JobHandle) -> str:
        return LocalBackend.logs(self, self._local(handle))
