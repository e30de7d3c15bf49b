"""MLflow bookkeeping for a `filipctl run`: one parent run per pipeline, one child run per stage.

mlflow is imported inside the functions so that importing filipctl stays fast.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

TAG_KIND = "filipctl.kind"  # "pipeline" or "stage"
TAG_RECIPE = "filipctl.recipe"
TAG_BACKEND = "filipctl.backend"
TAG_STAGE = "filipctl.stage"
TAG_JOB = "filipctl.job_id"
TAG_KEY_METRIC = "filipctl.key_metric"
TAG_WORKDIR = "filipctl.workdir"
TAG_RAY_RUN = "filipctl.ray_run"  # the Ray Train run (= its folder under the storage path)
PARENT = "mlflow.parentRunId"


def resolve_uri(uri: str | None) -> str:
    """The recipe's tracking URI, or a sqlite store in the working directory."""
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


# Keys whose values never reach MLflow: anything under env_vars, and keys named like credentials
# (matched on the end of the name, so model.token_keep stays a parameter).
SECRET_SECTIONS = ("env_vars",)
SECRET_SUFFIXES = ("secret", "password", "token", "credentials", "access_key", "secret_key", "api_key")
REDACTED = "<redacted>"


def _is_secret(key: str) -> bool:
    key = key.lower()
    return key in SECRET_SECTIONS or key.endswith(SECRET_SUFFIXES)


def redact(d: Any) -> Any:
    """A copy with every value under a secret-looking key replaced, for params, tags and artifacts."""
    if isinstance(d, dict):
        return {k: REDACTED if _is_secret(str(k)) else redact(v) for k, v in d.items()}
    return d


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) or v is None else str(v)
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str) -> None:
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        # "Creating initial MLflow database tables..." on every new store: noise in the run's output.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                # Artifacts beside the database, not in whatever folder a later command runs from.
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id

    def start_pipeline(self, name: str, recipe: dict[str, Any], recipe_path: str, backend: str,
                       tags: dict[str, str], recipe_yaml: str, versions: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            TAG_KIND: "pipeline", TAG_RECIPE: recipe["name"], TAG_BACKEND: backend,
            "filipctl.recipe_path": recipe_path, "mlflow.source.name": "filipctl run", **tags,
        })
        run_id = run.info.run_id
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

    def start_stage(self, parent_id: str, stage: str, recipe_name: str, backend: str, key_metric: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            PARENT: parent_id, TAG_KIND: "stage", TAG_STAGE: stage, TAG_RECIPE: recipe_name,
            TAG_BACKEND: backend, TAG_KEY_METRIC: key_metric,
        })
        # Queued until its job starts; the job marks it RUNNING (jobs.metrics.StageLogger).
        self.client.update_run(run.info.run_id, status="SCHEDULED")
        return run.info.run_id

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if text:
            self.client.log_text(run_id, text, artifact_file)

    def end(self, run_id: str, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)

    def metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)
