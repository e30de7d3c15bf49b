"""Slurm backend: each stage is a Slurm job submitted through submitit, chained with afterok.

Job ids are self-describing, "<slurm id>@<submitit folder>", so `status`, `logs` and `cancel`
work from any later process (`filipctl status`, `filipctl cancel`) without extra state.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar

from filipctl.backends.base import JobRequest, JobState
from filipctl.contract import worker_args
from filipctl.errors import FilipctlError
from filipctl.schema import SlurmProfile

NOT_A_LOGIN_NODE = ("srun/sbatch not found: this machine is not a Slurm login node (`--dry-run` shows the "
                    "plan anywhere; bring up a test cluster with scripts/slurm-up.sh)")

# sacct states -> ours. REQUEUED/PREEMPTED/TIMEOUT are transient when submitit requeues the job.
_STATES = {
    "PENDING": JobState.PENDING, "REQUEUED": JobState.PENDING, "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING, "CONFIGURING": JobState.PENDING, "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "PREEMPTED": JobState.PENDING,
    "TIMEOUT": JobState.PENDING, "COMPLETED": JobState.COMPLETED, "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED, "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED, "CANCELLED": JobState.CANCELLED, "REVOKED": JobState.CANCELLED,
}


def split_job_id(job_id: str) -> tuple[str, Path]:
    slurm_id, _, folder = job_id.partition("@")
    return slurm_id, Path(folder)


class SlurmBackend:
    name: ClassVar[str] = "slurm"
    native_dependencies: ClassVar[bool] = True

    def __init__(self, profile: SlurmProfile | None = None) -> None:
        self.profile = profile or SlurmProfile()

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
            extra["dependency"] = "afterok:" + ":".join(split_job_id(j)[0] for j in request.after)
            # A failed dependency cancels this job instead of leaving it pending forever.
            extra["kill_on_invalid_dep"] = "yes"
        params: dict[str, object] = dict(
            job_name=f"filip-{stage.name}", time=p.time_min, signal_delay_s=p.signal_delay_s,
            partition=p.partition, account=p.account, qos=p.qos, constraint=p.constraint,
            setup=list(p.setup), additional_parameters=extra,
        )
        if stage.distributed:
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

    def submit(self, request: JobRequest) -> str:
        import submitit

        ex = self._executor(request)
        try:
            job = ex.submit(self._job(request))
        except submitit.core.utils.FailedJobError as exc:
            raise FilipctlError(f"Slurm refused the {request.stage.name} job: {exc}") from None
        return f"{job.job_id}@{ex.folder}"

    # -- queries --------------------------------------------------------------------------------

    def status(self, job_id: str) -> JobState:
        import submitit

        slurm_id, folder = split_job_id(job_id)
        job = submitit.SlurmJob(folder=folder, job_id=slurm_id)
        raw = job.watcher.get_state(slurm_id, mode="force")  # the cached state lags; ask sacct now
        word = raw.split()[0] if raw else "UNKNOWN"
        # sacct can lag a second or two behind a fresh submission: unknown means not started yet.
        return _STATES.get(word, JobState.PENDING if word == "UNKNOWN" else JobState.UNKNOWN)

    def raw_state(self, job_id: str) -> str:
        slurm_id, _ = split_job_id(job_id)
        res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,Reason", "-j", slurm_id],
                             capture_output=True, text=True, timeout=30)
        line = res.stdout.strip().splitlines()[:1]
        return line[0].replace("|", " ") if line else "UNKNOWN"

    def cancel(self, job_id: str) -> None:
        slurm_id, _ = split_job_id(job_id)
        subprocess.run(["scancel", slurm_id], capture_output=True, text=True, timeout=30)

    def logs(self, job_id: str) -> str:
        slurm_id, folder = split_job_id(job_id)
        parts = []
        for suffix in ("out", "err"):
            for path in sorted(folder.glob(f"{slurm_id}_*_log.{suffix}")):
                parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')}")
        return "\n".join(parts)
