"""What a Slurm task runs: one stage's job module inside the process submitit starts on the node.

The Slurm backend pickles a `StageJob`; on the node it sets the environment the CLI chose (MLflow
run, events file), joins the torch.distributed group described by Slurm's variables when the
stage is distributed, and calls the same job module `main()` that the local backend runs. On
preemption or timeout submitit calls `checkpoint()`, which requeues the same job: pretraining
then resumes from its latest DeepSpeed checkpoint by itself. The job's end is recorded in
MLflow by the control side (the CLI that waits, or `filipctl status` reading sacct).
"""

from __future__ import annotations

import importlib
import os

import submitit

from filipctl.contract import port_from_job_id


class JobFailed(RuntimeError):
    """Makes Slurm record the job as FAILED; the job's own message is already in its log."""


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, module: str, argv: list[str], env: dict[str, str], distributed: bool) -> None:
        self.module = module
        self.argv = argv
        self.env = env
        self.distributed = distributed

    def __call__(self) -> None:
        os.environ.update(self.env)
        if self.distributed:
            from jobs.train.distributed import slurm_env

            os.environ.setdefault("MASTER_PORT", str(port_from_job_id(os.environ["SLURM_JOB_ID"])))
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first node) from the job step's SLURM_* variables: the tasks
            # srun started this time, which a node range (nodes: MIN-MAX) makes a count Slurm decides at each start.
            os.environ.update(slurm_env(os.environ))
        code = importlib.import_module(self.module).main(self.argv)
        if code:
            raise JobFailed(f"{self.module} exited with status {code}")
