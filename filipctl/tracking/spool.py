"""Tracking spools: append-only files of what was logged, sent to MLflow whenever the store answers.

Two writers, one format. A stage's job appends to its stage folder's spool (jobs/stage_logger.py); the
stage's MLflow run is named beside it in run.json. The control side (tracking.writer.Tracker) appends
each command's writes to an outbox of its own beside the state index, every record naming its run.
A store that is down or locked therefore stalls nothing: records wait, and go in later with the
steps and times they were logged at (by the running CLI, by `filipctl status` or `filipctl sync`).

One JSON object per line: {"t": ms logged, "op": ..., "run": id (outbox only), ...}
    metrics   step, values {name: float}, model_sha256 (optional: also metrics of the logged model with these
              weights, linked to it)
    tags, params   values {name: str}
    model     path (a weights file), name, tags, params, recipe (redacted): an MLflow logged model of the run, made
              once (tags[contract.TAG_WEIGHTS] finds it again), its artifacts the file and recipe.json
    artifact  path, artifact_path, owned (delete the file once uploaded: a copy made for the outbox)
    status    status (MLflow's word), end (ms; set for an ended run)
    dataset   name, digest, source_type, source, profile, context
How far each run got is kept in `<spool>.sent.json` ({run: byte offset}); a lock file keeps two
processes from sending the same records.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filipctl.contract import TAG_WEIGHTS, write_atomic

# MLflow's limits per log_batch call.
MAX_METRICS, MAX_TAGS, MAX_PARAMS = 1000, 100, 100
CHUNK_BYTES = 4 << 20  # read at most this much of a spool per pass
# MLflow's answers that no retry will change: the record is set aside (dropped file), the rest goes on.
# Not BAD_REQUEST or PERMISSION_DENIED: MLflow's client names any HTTP 400/403 so, also a proxy's or an expired
# token's, which say nothing about the record.
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"}


class StoreUnavailable(Exception):
    """The store did not take a record (down, locked, timing out): try again later."""


@dataclass(frozen=True)
class Spool:
    path: Path
    run_id: str = ""  # where records without a "run" go (a stage's run); "" for an outbox

    @property
    def sent_file(self) -> Path:
        return self.path.with_name(self.path.name + ".sent.json")

    @property
    def dropped_file(self) -> Path:
        return self.path.with_name(self.path.name + ".dropped.jsonl")

    def offset(self) -> int:
        try:
            return int(json.loads(self.sent_file.read_text()).get(self.run_id, 0))
        except (OSError, ValueError, AttributeError):
            return 0

    def _set_offset(self, offset: int) -> None:
        try:
            sent = json.loads(self.sent_file.read_text())
        except (OSError, ValueError):
            sent = {}
        sent[self.run_id] = offset
        write_atomic(self.sent_file, json.dumps(sent))

    def pending(self) -> int:
        """Whole records not yet sent."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset())
                return f.read().count(b"\n")
        except OSError:
            return 0

    def _records(self, start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(offset after the record, record) of the whole lines from `start`; None for a line that does not parse."""
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(CHUNK_BYTES)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) == CHUNK_BYTES:  # one line longer than a chunk: not from our writers
                yield start + len(data), None
            return
        pos = start
        for line in data[: end + 1].splitlines(keepends=True):
            pos += len(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            yield pos, record if isinstance(record, dict) else None

    def send(self, client, deadline: float | None = None) -> int:
        """Send what was not sent yet, in order -> records sent. Raises StoreUnavailable when the store stops
        answering (what went in is remembered). Returns 0 at once if another process is sending this spool;
        stops between batches once `deadline` (time.monotonic()) has passed."""
        import time

        if not self.path.is_file():
            return 0
        lock = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0
            sent = 0
            while deadline is None or time.monotonic() < deadline:
                batch = list(self._records(self.offset()))
                if not batch:
                    break
                sent += self._send_batch(client, batch)
            return sent
        finally:
            lock.close()

    def _send_batch(self, client, batch: list[tuple[int, dict[str, Any] | None]]) -> int:
        sent = 0
        group: list[tuple[int, dict[str, Any]]] = []  # consecutive metrics/tags/params of one run: one log_batch
        for end, record in batch:
            if record is None:  # what came before it goes first: the offset only ever moves past what was handled
                if group:
                    sent += self._apply(client, group)
                    group = []
                self._drop({"line_ending_at": end}, "not a JSON record")
                self._set_offset(end)
                continue
            record.setdefault("run", self.run_id)
            batched = record.get("op") in ("metrics", "tags", "params")
            if group and (not batched or group[0][1]["run"] != record["run"]):
                sent += self._apply(client, group)
                group = []
            if not batched:
                sent += self._apply(client, [(end, record)])
                continue
            group.append((end, record))
            if sum(len(r["values"]) for _, r in group) >= MAX_METRICS:
                sent += self._apply(client, group)
                group = []
        if group:
            sent += self._apply(client, group)
        return sent

    def _apply(self, client, items: list[tuple[int, dict[str, Any]]]) -> int:
        """Send `items` (offset after each, record) in one call; when the store refuses the call for good, send them
        one by one so that only the refused ones are set aside."""
        records = [r for _, r in items]
        try:
            _call(client, records)
        except Exception as exc:  # noqa: BLE001 - classified: a permanent refusal sets the records aside
            if not _is_permanent(exc):
                raise StoreUnavailable(_why(exc)) from exc
            if len(items) > 1:
                return sum(self._apply(client, [item]) for item in items)
            self._drop(records[0], f"{type(exc).__name__}: {exc}"[:500])
        self._set_offset(items[-1][0])
        for r in records:
            if r.get("op") == "artifact" and r.get("owned"):
                Path(r["path"]).unlink(missing_ok=True)
        return len(records)

    def _drop(self, record: dict[str, Any], why: str) -> None:
        with open(self.dropped_file, "a") as f:
            f.write(json.dumps({"why": why, "record": record}) + "\n")


def _is_permanent(exc: Exception) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True  # an artifact whose file is gone (a stage folder started over)
    if isinstance(exc, (KeyError, TypeError, ValueError)) and not hasattr(exc, "error_code"):
        return True  # a record our writers did not write
    return getattr(exc, "error_code", "") in PERMANENT


def _why(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" + ("..." if len(text) > 160 else "")


def _call(client, records: list[dict[str, Any]]) -> None:
    """One MLflow call for `records`: a batch of metrics/tags/params of one run, or one other record."""
    from mlflow.entities import Metric, Param, RunTag

    first = records[0]
    run, op = first["run"], first.get("op")
    if op in ("metrics", "tags", "params"):
        models = {r["model_sha256"]: _logged_model(client, run, r["model_sha256"]) for r in records
                  if r["op"] == "metrics" and r.get("model_sha256")}
        metrics = [Metric(k, float(v), int(r["t"]), int(r.get("step", 0)), model_id=models.get(r.get("model_sha256")))
                   for r in records if r["op"] == "metrics" for k, v in r["values"].items()]
        tags: dict[str, str] = {}
        params: dict[str, str] = {}
        for r in records:
            if r["op"] == "tags":
                tags.update(r["values"])
            elif r["op"] == "params":
                params.update(r["values"])
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        param_list = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(tag_list), len(param_list)), MAX_TAGS):  # MAX_TAGS == MAX_PARAMS
            client.log_batch(run, tags=tag_list[i : i + MAX_TAGS], params=param_list[i : i + MAX_PARAMS])
        for i in range(0, len(metrics), MAX_METRICS):
            client.log_batch(run, metrics=metrics[i : i + MAX_METRICS])
        if any(models.values()):  # the run that measured a model names it as its input (the UI links them)
            from mlflow.entities import LoggedModelInput

            client.log_inputs(run, models=[LoggedModelInput(m) for m in models.values() if m])
    elif op == "artifact":
        client.log_artifact(run, first["path"], first.get("artifact_path"))
    elif op == "status":
        if first.get("end"):
            client.set_terminated(run, status=first["status"], end_time=int(first["end"]))
        else:
            client.update_run(run, status=first["status"])
    elif op == "dataset":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=first["name"], digest=first["digest"], source_type=first["source_type"],
                          source=first["source"], profile=first["profile"])
        client.log_inputs(run, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", first["context"])])])
    elif op == "model":
        _log_model(client, run, first)
    else:
        raise ValueError(f"unknown spool record {op!r}")


def _models(client, run: str, sha256: str) -> list:
    """The logged models in `run`'s experiment with weights `sha256` (tag contract.TAG_WEIGHTS), newest first."""
    experiment = client.get_run(run).info.experiment_id
    return list(client.search_logged_models([experiment], filter_string=f"tags.`{TAG_WEIGHTS}` = '{sha256}'",
                                            order_by=[{"field_name": "creation_timestamp", "ascending": False}]))


def _ready(model) -> bool:
    return str(model.status).rpartition(".")[2] == "READY"


def _logged_model(client, run: str, sha256: str) -> str | None:
    """The newest READY logged model with weights `sha256`, or None: metrics of weights that no filipctl run logged
    (a state dict given to `filipctl eval`) stay the run's alone."""
    return next((m.model_id for m in _models(client, run, sha256) if _ready(m)), None)


def _log_model(client, run: str, record: dict[str, Any]) -> None:
    """A weights file as a logged model of `run` (the UI's "Logged models"): made once, its files uploaded, then
    READY; a resend after a crash between those steps finishes the model it had made."""
    import shutil
    import uuid

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    source = Path(record["path"])
    if not source.is_file():
        raise FileNotFoundError(source)
    sha = record["tags"].get(TAG_WEIGHTS, "")
    model = next((m for m in _models(client, run, sha) if m.source_run_id == run), None) if sha else None
    if model is None:
        model = client.create_logged_model(client.get_run(run).info.experiment_id, name=record["name"],
                                           source_run_id=run, tags=record["tags"], params=record.get("params") or {},
                                           model_type="filip")
    elif _ready(model):
        return
    # log_model_artifacts takes a folder: one beside the weights, the file hard-linked into it (no copy of GBs).
    folder = source.parent / f".logged-model-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
    except OSError:  # a stage folder this process cannot write: a copy in a temporary folder
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="filipctl-model-"))
    try:
        try:
            os.link(source, folder / source.name)
        except OSError:
            shutil.copyfile(source, folder / source.name)
        if record.get("recipe"):
            (folder / "recipe.json").write_text(json.dumps(record["recipe"], indent=1))
        client.log_model_artifacts(model.model_id, str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run, models=[LoggedModelOutput(model.model_id, step=0)])


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one record (the control side's outbox; jobs append through jobs/stage_logger.py)."""
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"t": int(time.time() * 1000), **record}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
