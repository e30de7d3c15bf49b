"""The contract between the CLI (control side) and the jobs it starts (worker side), in one place.

Everything that crosses that seam is spelled here and nowhere else: the run folder's layout,
the environment variables a job reads, the worker command line, the MLflow tag names, and how
a job reports an error a user can fix. Both sides import this module (jobs/ and models/ may
import nothing else from filipctl but the schema), so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from filipctl.schema import Recipe

# -- environment variables a job reads ---------------------------------------------------------------
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"  # where the stage's MLflow run lives
ENV_RUN_ID = "FILIPCTL_MLFLOW_RUN_ID"  # the stage's MLflow run (metrics, artifacts, tags)
ENV_EVENTS = "FILIPCTL_EVENTS"  # JSON-lines file the CLI tails for progress bars
ENV_SPOOL = "FILIPCTL_SPOOL"  # the stage's tracking spool: what the job logs, forwarded to MLflow by the CLI
ENV_RANK_CPUS = "FILIPCTL_RANK_CPUS"  # CPU cores the launcher reserved for each rank (Ray: resources_per_worker)
ENV_STOP_AT_STEP = "FILIPCTL_STOP_AT_STEP"  # pretraining stops after the checkpoint of this step (to continue it elsewhere)
# What a driver (Ray) forwards to the workers it starts; credentials are never forwarded.
JOB_ENV = (ENV_TRACKING_URI, ENV_RUN_ID, ENV_EVENTS, ENV_SPOOL, ENV_STOP_AT_STEP)

# -- MLflow tags -------------------------------------------------------------------------------------
TAG_KIND = "filipctl.kind"  # "pipeline" (a run), "ablation", "variant" (of an ablation) or "stage"
TAG_RECIPE = "filipctl.recipe"
TAG_RECIPE_PATH = "filipctl.recipe_path"
TAG_BACKEND = "filipctl.backend"
TAG_CLUSTER = "filipctl.cluster"
TAG_STAGE = "filipctl.stage"
TAG_JOB = "filipctl.job_id"
TAG_KEY_METRIC = "filipctl.key_metric"
TAG_WORKDIR = "filipctl.workdir"
TAG_FINGERPRINT = "filipctl.fingerprint"
TAG_RAY_RUN = "filipctl.ray_run"  # the Ray Train run (= its folder under the storage path)
TAG_RAY_STORAGE = "filipctl.ray_storage"
TAG_PARENT = "mlflow.parentRunId"
TAG_VARIANT = "filipctl.variant"  # on a variant run of an ablation: its setting
TAG_SETTING = "filipctl.setting"  # on an ablation variant's runs (its stages' too): the setting, e.g. +late
TAG_SEED = "filipctl.seed"  # ... and its seed: the runs table groups by these
TAG_ABLATION = "filipctl.orchestration.ablation"  # on a variant run: the run id of its ablation
TAG_CACHED = "filipctl.cached"  # on a stage run: reused from an earlier run of the same key
TAG_STAGE_KEY = "filipctl.stage_key"
TAG_DATA_DIGEST = "filipctl.data_digest"  # sha256 of the data index: every shard's URL and digest (jobs/data/index.py)
TAG_PATCH_DIGEST = "filipctl.git_patch_sha256"  # of the uncommitted changes logged as source.patch ("" = none)
TAG_EVALUATED = "filipctl.evaluated"  # on a `filipctl eval` run: what it evaluated (run id or path)
TAG_RESUMES = "filipctl.resumes"  # on a stage run: how many later commands continued it (filipctl.resume.K: by which)
TAG_CODE_DIGEST = "filipctl.code_digest"  # of the worker code (jobs/, models/) that entered the stage keys
TAG_WEIGHTS = "filipctl.weights_sha256"  # on an eval run and a logged model: sha256 of the weights (model.pt)


# -- the stage folder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDir:
    """One folder per stage and content key (filipctl/orchestration/graph.py): what the stage reads and writes.

    A rerun of the same stage (same key) finds its folder again: its checkpoints to resume from, or
    its `done.json` when it completed, so it is not run twice. The stages it depends on are other
    folders, named in `inputs.json`.
    """

    root: Path

    @property
    def recipe(self) -> Path:  # the resolved recipe, JSON, written by the CLI before the job starts
        return self.root / "recipe.json"

    @property
    def inputs_file(self) -> Path:  # {stage name: folder} of the stages this one reads from
        return self.root / "inputs.json"

    def input(self, stage: str) -> "RunDir":
        """The folder of the stage `stage` this one depends on (itself when it has no inputs file)."""
        import json

        if not self.inputs_file.is_file():
            return self
        inputs = json.loads(self.inputs_file.read_text())
        if stage not in inputs:
            raise JobError(f"{self.inputs_file}: no {stage!r} input; the stage graph did not give one")
        return RunDir(Path(inputs[stage]))

    def input_digest(self, stage: str) -> str | None:
        """The sha256 the CLI already took of input `stage` when it came from outside the graph (a model.pt given
        to `filipctl eval`), so that the job does not hash it again; None when not recorded."""
        import json

        try:
            return json.loads(self.inputs_file.read_text()).get("digests", {}).get(stage)
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def done(self) -> Path:  # written by the CLI when the stage completed: its key and metrics
        return self.root / "done.json"

    @property
    def data_index(self) -> Path:  # the data stage's index of the shards every later stage reads
        return self.root / "data.json"

    @property
    def checkpoints(self) -> Path:  # DeepSpeed checkpoints (local and Slurm backends)
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:  # final fp32 weights (state_dict), written by pretraining
        return self.root / "model.pt"

    @property
    def result(self) -> Path:  # written by the job as it completes: the one channel of results to the CLI
        return self.root / "result.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def slurm(self) -> Path:  # submitit's folder: sbatch scripts, pickles, per-task logs
        return self.root / "slurm"

    @property
    def tracking(self) -> Path:
        """The stage's tracking spool and what goes with it (filipctl/tracking/spool.py): the job appends what it
        logs to `spool.jsonl` (metrics, tags, files to upload), the CLI forwards it to the stage's MLflow run
        named in `run.json` and keeps how far it got in `sent.json`. Training never waits for MLflow."""
        return self.root / "tracking"

    @property
    def spool(self) -> Path:
        return self.tracking / "spool.jsonl"

    @property
    def node_spools(self) -> list[Path]:
        """Each node's system metrics spool (`node_spool`), forwarded to the stage's run like `spool`."""
        found = self.tracking.glob(f"{NODE_SPOOL_PREFIX}*.jsonl")
        return sorted(p for p in found if not p.name.endswith(".dropped.jsonl"))

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    def events(self, stage: str) -> Path:
        return self.logs / f"{stage}.events.jsonl"

    def job_record(self, stage: str) -> Path:  # local/Ray backends: pid, log, exit code
        return self.logs / f"{stage}.job.json"

    @property
    def errors(self) -> Path:  # one record per failed worker process (write_error_record), cleared at each submit
        return self.logs / "errors"


NODE_SPOOL_PREFIX = "system-"
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's key prefix of system metrics: system/<node>/<metric>


def node_spool(spool: Path, node: str) -> Path:
    """Where node `node` appends its system metrics (jobs/system_metrics.py), beside the stage's spool `spool`: a file
    per node, one writer per file, so that nodes appending over a shared file system never tear each other's lines."""
    return spool.with_name(f"{NODE_SPOOL_PREFIX}{node}.jsonl")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB pieces: the identity of a checkpoint (eval keys, results)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a run-folder file so that a reader never sees it half-written (write aside, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_result(run_dir: RunDir, metrics: dict[str, float], digests: dict[str, str] | None = None,
                 skipped: int = 0) -> None:
    """What a completed job hands the control side (result.json in its stage folder): its final metrics, the
    sha256 of what it produced or read (`{"model.pt": ..., "data": ...}`) and the samples it skipped.
    The CLI reads this, never the metrics back from MLflow. It also names the MLflow run the job logged to
    (its loss curve), which a later run that reuses the stage points at (`filipctl reproduce`)."""
    import json

    write_atomic(run_dir.result, json.dumps({"metrics": {k: float(v) for k, v in metrics.items()},
                                             "digests": dict(digests or {}), "skipped_samples": int(skipped),
                                             "mlflow_run": os.environ.get(ENV_RUN_ID, "")}, indent=1))


def read_result(run_dir: RunDir) -> dict | None:
    """The job's result.json, or None when it wrote none (it did not complete) or it cannot be read."""
    import json

    try:
        result = json.loads(run_dir.result.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("metrics"), dict) else None


# -- the worker command line -------------------------------------------------------------------------
def worker_argv(python: str, module: str, run_dir: RunDir) -> list[str]:
    """`python -m MODULE --workdir DIR`: how every backend starts a job module (once per process)."""
    return [python, "-m", module, *worker_args(run_dir)]


def worker_args(run_dir: RunDir) -> list[str]:
    return ["--workdir", str(run_dir.root)]


def parse_worker_args(argv: list[str] | None, doc: str | None = None) -> RunDir:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run folder the CLI prepared (recipe.json inside)")
    return RunDir(Path(parser.parse_args(argv).workdir))


def read_recipe(run_dir: RunDir) -> "Recipe":
    """The typed recipe the CLI resolved and validated, read back on the worker."""
    from filipctl.schema import Recipe

    return Recipe.model_validate_json(run_dir.recipe.read_text())


class JobError(Exception):
    """A job cannot go on for a reason the user can fix: its message is the whole story, no traceback."""


def exit_status(body: Callable[[], object], run_dir: RunDir | None = None) -> int:
    """Run a process's work -> its exit status: a JobError is one `error: ...` line on stderr (what the CLI quotes
    of a failed job's log) and status 1, no traceback. Every job module and the Ray driver end through here.

    With `run_dir`, any exception also leaves an error record in the stage folder (write_error_record), which
    the CLI prints instead of the launcher's summary; one that is not a JobError still propagates, so its
    traceback reaches the job log."""
    try:
        body()
    except JobError as exc:
        if run_dir is not None:
            write_error_record(run_dir, exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        if run_dir is not None:
            write_error_record(run_dir, exc)
        raise
    return 0


def job_main(run: Callable[["Recipe", RunDir], object], argv: list[str] | None, doc: str | None) -> int:
    """The entry point of a job module: parse the command line, read the recipe, run; JobError -> exit 1."""
    run_dir = parse_worker_args(argv, doc)
    return exit_status(lambda: run(read_recipe(run_dir), run_dir), run_dir)


# -- error records: the cause of a failed job, for the CLI -------------------------------------------
# A launcher's own summary (torchrun's ChildFailedError box, submitit's FailedJobError) names an exit status,
# not a cause. Each worker process that fails writes `logs/errors/rank<R>.<pid>.json` in the stage folder every
# backend shares; the CLI prints the first one of the last attempt. Attempts: torchrun restarts and Slurm
# requeues keep the folder, so a record says which attempt wrote it.
ATTEMPT_ENV = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def _named_file(exc: BaseException) -> str:
    """The file an exception names: an OSError's filename, else the first existing absolute path in its message."""
    import re

    for name in (getattr(exc, "filename", None), getattr(exc, "filename2", None)):
        if isinstance(name, (str, os.PathLike)) and str(name):
            return str(name)
    for candidate in re.findall(r"(/[^\s'\"`,;:()\[\]]+)", str(exc)):
        if os.path.exists(candidate.rstrip(".")):
            return candidate.rstrip(".")
    return ""


def _message(exc: BaseException) -> str:
    """The exception's own words; for one re-raised from a DataLoader worker ("Caught X in DataLoader worker
    process 0. Original Traceback ..."), the original's last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return last.removeprefix(f"{type(exc).__name__}: ")
    return text


def write_error_record(run_dir: RunDir, exc: BaseException) -> None:
    """Record why this worker process failed (never raises: the exception itself must still reach the log)."""
    import json
    import time
    import traceback

    rank = int(os.environ.get("RANK", "0") or 0)
    attempt = max(int(os.environ.get(name, "0") or 0) for name in ATTEMPT_ENV)
    record = {"rank": rank, "attempt": attempt, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
              "type": type(exc).__name__, "message": _message(exc), "file": _named_file(exc),
              "job_error": isinstance(exc, JobError),
              # A JobError is the user's to fix and a restart only repeats it, unless the job says otherwise (a rank
              # that stopped: jobs/train/distributed.py).
              "restartable": not isinstance(exc, JobError) or bool(getattr(exc, "restartable", False)),
              "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    try:
        run_dir.errors.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir.errors / f"rank{rank}.{os.getpid()}.json", json.dumps(record, indent=1))
    except (OSError, ValueError):
        pass


def first_error(run_dir: RunDir) -> dict | None:
    """The error record of the first process to fail in the job's last attempt; None when none left one."""
    import json

    records = []
    for path in run_dir.errors.glob("rank*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("time"), (int, float)):
            records.append(record)
    if not records:
        return None
    last = max(int(r.get("attempt", 0)) for r in records)
    return min((r for r in records if int(r.get("attempt", 0)) == last), key=lambda r: r["time"])


def describe_error(record: dict, with_rank: bool = True) -> str:
    """An error record as one line: "rank 1: RuntimeError: ... (file ...)"; a JobError's message needs no type."""
    message = " ".join(str(record.get("message", "")).split())
    if len(message) > 600:
        message = message[:600] + " ..."
    line = message if record.get("job_error") else f"{record.get('type', 'Exception')}: {message}"
    file = record.get("file") or ""
    if file and file not in message:
        line += f" (file {file})"
    return f"rank {record.get('rank', 0)}: {line}" if with_rank else line


def clear_error_records(run_dir: RunDir) -> None:
    """Before a job is submitted: the records of an earlier run of the stage do not describe this one."""
    import shutil

    shutil.rmtree(run_dir.errors, ignore_errors=True)


# -- ports for a process group's rendezvous ----------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_from_job_id(job_id: str) -> int:
    """The same master port on every task and every requeue of a scheduler's job.

    Below Linux's ephemeral range (32768-60999), where an outgoing connection could hold a
    port drawn at random (EADDRINUSE seen in CI).
    """
    return 20000 + int(job_id) % 12000


def job_env(tracking_uri: str, run_id: str, events: Path, spool: Path) -> dict[str, str]:
    """What the CLI tells a job about where to report."""
    return {ENV_TRACKING_URI: tracking_uri, ENV_RUN_ID: run_id, ENV_EVENTS: str(events), ENV_SPOOL: str(spool)}


def forwarded_env() -> dict[str, str]:
    """The job variables of this process, for a driver to hand its workers."""
    return {k: os.environ[k] for k in JOB_ENV if k in os.environ}
