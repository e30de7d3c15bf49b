"""Metric logging from workers: rank 0 writes to the stage's MLflow run, every other rank is silent.

Workers log metrics, artifacts and tags only. A run's state (scheduled, running, finished,
failed, killed) is written on the control side alone, by filipctl.tracking.writer.Tracker.
"""

from __future__ import annotations

import os
import time

from filipctl.contract import ENV_RUN_ID


class StageLogger:
    """Logs to the MLflow run the orchestrator named in the environment (contract.ENV_RUN_ID), if any."""

    def __init__(self, enabled: bool) -> None:
        self.run_id = os.environ.get(ENV_RUN_ID) if enabled else None
        self._client = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()  # the tracking URI comes from the environment too

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

    def text(self, text: str, artifact_file: str) -> None:
        if self._client:
            self._client.log_text(self.run_id, text, artifact_file)

    def tags(self, values: dict[str, str]) -> None:
        if self._client:
            for k, v in values.items():
                self._client.set_tag(self.run_id, k, v)
