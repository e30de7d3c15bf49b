"""The control side's MLflow writer: the one code that writes a run's state.

One parent run per `filipctl run`, one child run per stage. `Tracker` is the only code that
writes a run's state (scheduled, running, finished, failed, killed); jobs on workers log
metrics, artifacts and tags only (jobs/stage_logger.py). Commands that only read (status, logs) read
through `store.open_store`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from filipctl.contract import (TAG_BACKEND, TAG_JOB, TAG_KEY_METRIC, TAG_KIND, TAG_PARENT, TAG_RECIPE, TAG_STAGE,
                               TAG_VARIANT)
from filipctl.tracking.redact import flatten, redact
from filipctl.states import MLFLOW_STATUS, State
from filipctl.tracking.store import open_store


class Tracker:
    """The control side's MLflow writer: creates runs, tags them and records every change of state."""

    def __init__(self, uri: str, experiment: str | None = None) -> None:
        import mlflow

        from filipctl.orchestration.state_index import StateStore, path_for

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = open_store(uri)
        self.experiment = experiment or ""
        self.experiment_id = self._experiment(experiment) if experiment else None
        self.state = StateStore(path_for(uri))  # the index `filipctl status` reads without MLflow

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # Artifacts beside the database, not in whatever folder a later command runs from.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start_run(self, name: str, kind: str, recipe: str, backend: str, tags: dict[str, str],
                  description: str = "") -> str:
        """A run of `kind` (pipeline, ablation); `description` is the markdown the MLflow UI shows."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            TAG_KIND: kind, TAG_RECIPE: recipe, TAG_BACKEND: backend, "mlflow.source.name": f"filipctl {kind}",
            **({"mlflow.note.content": description} if description else {}), **tags,
        })
        self.state.add_run(run.info.run_id, self.experiment, kind, name, recipe, backend,
                           parent=tags.get(TAG_PARENT, ""), variant=tags.get(TAG_VARIANT, ""))
        return run.info.run_id

    def start_pipeline(self, name: str, recipe: dict[str, Any], backend: str, tags: dict[str, str],
                       recipe_yaml: str, versions: dict[str, str], description: str = "", kind: str = "pipeline") -> str:
        """A run of one recipe's stages (kind "variant" inside an ablation): params, recipe, versions."""
        run_id = self.start_run(name, kind, recipe["name"], backend, tags, description)
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(redact(recipe)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i : i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "recipe.yaml").write_text(recipe_yaml)
            (Path(tmp) / "versions.json").write_text(json.dumps(versions, indent=1))
            self.client.log_artifact(run_id, str(Path(tmp) / "recipe.yaml"))
            self.client.log_artifact(run_id, str(Path(tmp) / "versions.json"))
        return run_id

    def start_stage(self, parent_id: str, stage: str, recipe_name: str, backend: str, key_metric: str,
                    folder: str = "", stage_key: str = "") -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            TAG_PARENT: parent_id, TAG_KIND: "stage", TAG_STAGE: stage, TAG_RECIPE: recipe_name,
            TAG_BACKEND: backend, TAG_KEY_METRIC: key_metric,
        })
        # Queued until its job is seen running.
        self.client.update_run(run.info.run_id, status="SCHEDULED")
        self.state.add_stage(run.info.run_id, parent_id, stage, key_metric, folder=folder, stage_key=stage_key)
        return run.info.run_id

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)
        if key == TAG_JOB:
            self.state.set_stage(run_id, job_id=value)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])
        self.state.set_metrics(run_id, metrics)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        """The data a run read, as an MLflow dataset input (the UI's Datasets column): its URL and content digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        scheme = url.split("://", 1)[0] if "://" in url else "local"
        dataset = Dataset(name=name[:500], digest=digest[:36], source_type=scheme, source=json.dumps({"uri": url}),
                          profile=json.dumps(profile))
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description in the MLflow UI."""
        self.client.set_tag(run_id, "mlflow.note.content", markdown)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """A file artifact whose bytes must arrive unchanged (a patch with CRLF or binary hunks)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if text:
            self.client.log_text(run_id, text, artifact_file)

    def set_state(self, run_id: str, state: State) -> None:
        """A run's new state: MLflow shows its view of it (MLFLOW_STATUS), the state index keeps it as it is."""
        status = MLFLOW_STATUS[state]
        if state.ended:
            self.client.set_terminated(run_id, status=status)
        else:
            self.client.update_run(run_id, status=status)
        self.state.set_state(run_id, state)
