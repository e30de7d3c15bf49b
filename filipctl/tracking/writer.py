"""The control side's MLflow writer: the one code that writes a run's state.

One parent run per `filipctl run`, one child run per stage. `Tracker` is the only code that
writes a run's state (scheduled, running, finished, failed, killed); jobs on workers log
metrics, artifacts and tags only (jobs/stage_logger.py). Commands that only read (status, logs) read
through `store.open_store`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from filipctl.contract import (TAG_BACKEND, TAG_JOB, TAG_KEY_METRIC, TAG_KIND, TAG_PARENT, TAG_RECIPE, TAG_RESUMES,
                               TAG_STAGE, TAG_VARIANT)
from filipctl.tracking import spool
from filipctl.tracking.redact import flatten, redact
from filipctl.states import MLFLOW_STATUS, State
from filipctl.tracking.store import open_store


# MLflow 3's UI opens an experiment by its kind: without this tag it guesses GenAI and shows an empty tracing
# overview; training opens on the runs table. A kind someone chose in the UI is kept.
EXPERIMENT_KIND, TRAINING = "mlflow.experimentKind", "custom_model_development"


def outbox_folder(uri: str) -> Path:
    """Where the control side's outboxes wait: beside the state index of the store."""
    import hashlib

    from filipctl.orchestration.state_index import path_for

    # One folder per store: an outbox names runs of its own store only (stores may share a working folder).
    return path_for(uri).parent / "filipctl-outbox" / hashlib.sha256(uri.encode()).hexdigest()[:12]


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
        # This command's writes, in order, until the store took them (filipctl/tracking/spool.py).
        self.outbox = spool.Spool(outbox_folder(uri) / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND not in exp.tags:  # an experiment made before filipctl set it (or by hand)
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, TRAINING)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # Artifacts beside the database, not in whatever folder a later command runs from.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: TRAINING})
        except Exception:  # noqa: BLE001 - another command created it a moment ago: use theirs
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

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
        params = {k: v[:6000] for k, v in flatten(redact(recipe)).items()}
        self._send({"op": "params", "run": run_id, "values": params})
        self.log_bytes(run_id, recipe_yaml.encode(), "recipe.yaml")
        self.log_bytes(run_id, json.dumps(versions, indent=1).encode(), "versions.json")
        return run_id

    def start_stage(self, parent_id: str, stage: str, recipe_name: str, backend: str, key_metric: str,
                    folder: str = "", stage_key: str = "") -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            TAG_PARENT: parent_id, TAG_KIND: "stage", TAG_STAGE: stage, TAG_RECIPE: recipe_name,
            TAG_BACKEND: backend, TAG_KEY_METRIC: key_metric,
        })
        self._send({"op": "status", "run": run.info.run_id, "status": "SCHEDULED"})  # queued until seen running
        self.state.add_stage(run.info.run_id, parent_id, stage, key_metric, folder=folder, stage_key=stage_key)
        return run.info.run_id

    def continue_stage(self, run_id: str, parent_id: str, stage: str, key_metric: str, folder: str,
                       stage_key: str) -> bool:
        """Resume the stage's MLflow run of an earlier attempt (one run per stage: one loss curve) under the run
        `parent_id` -> False when that run cannot be continued (gone, or another experiment). Each resume is
        recorded on the run: filipctl.resumes (how many) and filipctl.resume.K (by which run, when)."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted, or another store: a new run instead
            return False
        if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage != "active":
            return False
        left_behind = run.data.tags.get(TAG_PARENT, "")
        resumes = int(run.data.tags.get(TAG_RESUMES, "0") or 0) + 1
        self._send({"op": "tags", "run": run_id, "values": {
            TAG_PARENT: parent_id, TAG_RESUMES: str(resumes),
            f"{TAG_RESUMES[:-1]}.{resumes}": f"{parent_id} at {time.strftime('%Y-%m-%d %H:%M:%S')}"}})
        self._send({"op": "status", "run": run_id, "status": "SCHEDULED"})
        self.state.add_stage(run_id, parent_id, stage, key_metric, folder=folder, stage_key=stage_key)
        if left_behind and left_behind != parent_id:
            self._end_left_behind(left_behind)
        return True

    def _end_left_behind(self, pipeline: str) -> None:
        """The pipeline a continued stage run leaves: if nobody recorded its end (its command was killed), it ended
        FAILED now, and what it never ran is SKIPPED; otherwise nothing would ever end it."""
        state = self.state.run_state(pipeline)
        if state is None or state.ended:
            return
        for s in self.state.stages(pipeline):
            if not State.parse(s["state"]).ended:
                self.set_state(s["run_id"], State.SKIPPED)
        self.set_state(pipeline, State.FAILED)

    def tag(self, run_id: str, key: str, value: str) -> None:
        self._send({"op": "tags", "run": run_id, "values": {key: str(value)}})
        if key == TAG_JOB:
            self.state.set_stage(run_id, job_id=value)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        if metrics:
            self._send({"op": "metrics", "run": run_id, "step": step,
                        "values": {k: float(v) for k, v in metrics.items()}})
        self.state.set_metrics(run_id, metrics)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a copy of `path` taken now (the file may change or go before the store answers)."""
        self.log_bytes(run_id, Path(path).read_bytes(), f"{artifact_path}/{Path(path).name}" if artifact_path
                       else Path(path).name)

    def log_dataset(self, run_id: str, name: str, url: str, digest: str, context: str, profile: dict[str, Any]) -> None:
        """The data a run read, as an MLflow dataset input (the UI's Datasets column): its URL and content digest."""
        scheme = url.split("://", 1)[0] if "://" in url else "local"
        self._send({"op": "dataset", "run": run_id, "name": name[:500], "digest": digest[:36], "source_type": scheme,
                    "source": json.dumps({"uri": url}), "profile": json.dumps(profile), "context": context})

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description in the MLflow UI."""
        self.tag(run_id, "mlflow.note.content", markdown)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """A file artifact whose bytes must arrive unchanged (a patch with CRLF or binary hunks): copied beside the
        outbox now, uploaded (and the copy deleted) when the store takes it."""
        folder = self.outbox.path.with_suffix("") / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(artifact_file).name
        path.write_bytes(data)
        parent = str(Path(artifact_file).parent)
        self._send({"op": "artifact", "run": run_id, "path": str(path), "artifact_path": None if parent == "." else parent,
                    "owned": True})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        if text:
            self.log_bytes(run_id, text.encode(), artifact_file)

    def set_state(self, run_id: str, state: State) -> None:
        """A run's new state: the state index keeps it as it is (at once), MLflow shows its view (MLFLOW_STATUS)."""
        self.state.set_state(run_id, state)
        self._send({"op": "status", "run": run_id, "status": MLFLOW_STATUS[state],
                    "end": int(time.time() * 1000) if state.ended else None})

    # -- the outbox -------------------------------------------------------------------------------------------

    def _send(self, record: dict[str, Any]) -> None:
        """Every write after a run is created: appended to this command's outbox, sent by `flush` or the
        forwarder, so that a store that stops answering stalls nothing and loses nothing."""
        spool.append(self.outbox.path, record)

    def flush(self, timeout_s: float) -> int:
        """Send this command's outbox, trying for at most `timeout_s` -> records still waiting (0: all in)."""
        from filipctl.tracking.forwarder import drain

        return drain([self.outbox], self.client, timeout_s)
