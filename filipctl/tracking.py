"""MLflow on the control side: the one writer of run state, and the check that a store answers.

One parent run per `filipctl run`, one child run per stage. `Tracker` is the only code that
writes a run's state (scheduled, running, finished, failed, killed); jobs on workers log
metrics, artifacts and tags only (jobs/metrics.py). Commands that only read (status, logs) read
through `open_store`. mlflow is imported inside the functions so that importing filipctl stays fast.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from filipctl.contract import (TAG_BACKEND, TAG_JOB, TAG_KEY_METRIC, TAG_KIND, TAG_PARENT, TAG_RECIPE, TAG_STAGE,
                               TAG_VARIANT)
from filipctl.errors import FilipctlError
from filipctl.schema import TRACKING_SCHEMES

TERMINAL = ("FINISHED", "FAILED", "KILLED")
ACTIVE = ("RUNNING", "SCHEDULED")


def resolve_uri(uri: str | None) -> str:
    """The recipe's tracking URI, or a sqlite store in the working directory."""
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def check_store(uri: str, timeout_s: float, must_exist: bool) -> None:
    """Fail in about `timeout_s` with one line when the tracking store cannot be used; write nothing.

    MLflow's own client retries an unanswering server with back-off for minutes, writes its tables
    into any sqlite file it is pointed at, and answers other mistakes with tracebacks. A server
    must answer MLflow's REST API (401/403 pass: MLflow brings the credentials); a sqlite store must
    be an MLflow database (`must_exist`: read commands) or a new file in a writable folder.
    """
    if not uri.startswith(TRACKING_SCHEMES):
        raise FilipctlError(f"tracking URI {uri!r}: not a store MLflow can use here; give sqlite:///PATH/mlflow.db, "
                            "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)")
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri, must_exist)
    else:
        _check_driver(uri)


# A database store needs its SQLAlchemy driver; MLflow would fail with a traceback deep inside.
DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("MySQLdb", "pymysql"), "mssql": ("pyodbc",)}


def _check_driver(uri: str) -> None:
    import importlib.util

    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    modules = DRIVERS.get(scheme)
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise FilipctlError(f"tracking store {uri.split('@')[-1]}: no {scheme} driver is installed "
                            f"(pip install {modules[0].lower()}), or use sqlite:///PATH/mlflow.db")


def _check_server(uri: str, timeout_s: float) -> None:
    import http.client
    import urllib.error
    import urllib.request

    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        urllib.request.urlopen(urllib.request.Request(probe, method="GET"), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a server that wants credentials: MLflow sends them (MLFLOW_TRACKING_TOKEN, ...)
        raise FilipctlError(f"{uri} answered HTTP {exc.code} to MLflow's API ({probe}): is it an MLflow tracking "
                            "server? check the address and port") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise FilipctlError(f"MLflow tracking server {uri} does not answer within {timeout_s:g} s ({why}); "
                            "check that it is running and reachable, or set tracking.uri / --tracking-uri "
                            "to another store") from None
    except (ValueError, http.client.HTTPException) as exc:
        raise FilipctlError(f"tracking URI {uri!r} is not a valid URL ({exc})") from None


def _check_sqlite(uri: str, must_exist: bool) -> None:
    import os
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if path.is_dir():
        raise FilipctlError(f"tracking store {uri}: {path} is a folder; name a database file, e.g. {path}/mlflow.db")
    if not path.exists():
        if must_exist:
            raise FilipctlError(f"no MLflow store at {uri}: run `filipctl run RECIPE` here first, or pass "
                                "--tracking-uri")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise FilipctlError(f"tracking store {uri}: cannot create {path.name} in {path.parent} (no such "
                                "writable folder)")
        return
    with open(path, "rb") as f:
        header = f.read(16)
    if header and header != b"SQLite format 3\x00":
        raise FilipctlError(f"tracking store {uri}: {path} is not an SQLite database")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise FilipctlError(f"tracking store {uri}: cannot read {path}: {exc}") from None
    if (tables or must_exist) and "experiments" not in tables:
        raise FilipctlError(f"tracking store {uri}: {path} is an SQLite database but not an MLflow store "
                            "(no experiments table); point tracking.uri / --tracking-uri at another file")


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


def open_store(uri: str):
    """An MlflowClient for reading, MLflow's initial-table chatter silenced."""
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store: noise in the run's output.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(uri)


class Tracker:
    """The control side's MLflow writer: creates runs, tags them and records every change of state."""

    def __init__(self, uri: str, experiment: str | None = None) -> None:
        import mlflow

        from filipctl.state import StateStore, path_for

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

    def start_stage(self, parent_id: str, stage: str, recipe_name: str, backend: str, key_metric: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            TAG_PARENT: parent_id, TAG_KIND: "stage", TAG_STAGE: stage, TAG_RECIPE: recipe_name,
            TAG_BACKEND: backend, TAG_KEY_METRIC: key_metric,
        })
        # Queued until its job is seen running.
        self.client.update_run(run.info.run_id, status="SCHEDULED")
        self.state.add_stage(run.info.run_id, parent_id, stage, key_metric)
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

    def running(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        self.state.set_state(run_id, "RUNNING", ended=False)

    def end(self, run_id: str, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        if status not in TERMINAL:
            raise ValueError(f"not a terminal run state: {status}")
        self.client.set_terminated(run_id, status=status)
        self.state.set_state(run_id, status, ended=True)

    def metrics(self, run_id: str) -> dict[str, float]:
        """What the run's job logged (read from MLflow; its key metric is kept in the state index too)."""
        metrics = dict(self.client.get_run(run_id).data.metrics)
        self.state.set_metrics(run_id, metrics)
        return metrics
