"""Run one stage's job module inside a scheduler's process (a Slurm task via submitit).

The scheduler pickles a `StageJob`; on the node it sets the environment the CLI chose (MLflow
run, events file), joins the torch.distributed group described by Slurm's variables when the
stage is distributed, and calls the same `main()` that the local backend runs. On preemption
or timeout submitit calls `checkpoint()`, which requeues the same job: pretraining then
resumes from its latest DeepSpeed checkpoint by itself.
"""

from __future__ import annotations

import importlib
import os

import submitit


class StageJob(submitit.helpers.Checkpointable):
    def __init__(self, module: str, argv: list[str], env: dict[str, str], distributed: bool) -> None:
        self.module = module
        self.argv = argv
        self.env = env
        self.distributed = distributed

    def __call__(self) -> None:
        os.environ.update(self.env)
        if self.distributed:
            # submitit would draw the port from 20000-60000, inside Linux's ephemeral range (32768-60999),
            # where an outgoing connection can hold it (EADDRINUSE seen in CI). Same rule on every task
            # and every requeue of the job: a port below that range, from the job id.
            os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 12000))
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first node) from SLURM_* variables.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        main = importlib.import_module(self.module).main
        try:
            code = main(self.argv)
        except SystemExit as exc:  # job modules exit with a message on user errors
            code = exc.code
        except Exception:
            self._finish("FAILED")
            raise
        # The CLI may have detached: the job itself records how it ended.
        self._finish("FINISHED" if code in (0, None) else "FAILED")
        if code not in (0, None):
            raise RuntimeError(f"{self.module} failed: {code}")

    def _finish(self, status: str) -> None:
        if os.environ.get("RANK", "0") == "0":
            from jobs.metrics import StageLogger

            StageLogger(True).finish(status)
