"""Metric logging from workers: rank 0 writes to the stage's MLflow run, every other rank is silent."""

from __future__ import annotations

import os
import time


class StageLogger:
    """Logs to the MLflow run whose id the orchestrator passed in FILIPCTL_MLFLOW_RUN_ID (if any)."""

    def __init__(self, enabled: bool) -> None:
        self.run_id = os.environ.get("FILIPCTL_MLFLOW_RUN_ID") if enabled else None
        self._client = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()
            run = self._client.get_run(self.run_id)
            if run.info.status == "SCHEDULED":
                self._client.update_run(self.run_id, status="RUNNING")

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if not self._client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self._client:
            self._client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str) -> None:
        """End the stage's run (FINISHED or FAILED) when no CLI is waiting to do it (detached runs)."""
        if self._client:
            self._client.set_terminated(self.run_id, status=status)

    def tags(self, values: dict[str, str]) -> None:
        if self._client:
            for k, v in values.items():
                self._client.set_tag(self.run_id, k, v)
