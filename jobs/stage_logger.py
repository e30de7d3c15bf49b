"""What a job logs for its stage's MLflow run, appended to the stage's tracking spool; rank 0 logs, the others not.

The job never talks to MLflow: a server that is down or a database that is locked must cost at
most late metrics, never a training step. Each call appends one JSON line to the spool the CLI
named (contract.ENV_SPOOL, `<stage folder>/tracking/spool.jsonl`) with the time it was logged;
the CLI forwards the lines to the run, with their original steps and times, whenever the store
answers (filipctl/tracking/spool.py reads this format). `sync()` makes what was appended durable:
it is called at every checkpoint and at the end.

A run's state (scheduled, running, finished, failed, killed) is written on the control side alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from filipctl.contract import ENV_RUN_ID, ENV_SPOOL


class StageLogger:
    """Appends to the spool the launcher named in the environment; silent when none was named (a job run by hand)."""

    def __init__(self, enabled: bool) -> None:
        spool = os.environ.get(ENV_SPOOL) if enabled else None
        self.spool = Path(spool) if spool else None
        self.run_id = os.environ.get(ENV_RUN_ID) if self.spool else None  # the run the CLI forwards the spool to
        self._file = None
        self.lost = 0  # records that could not be written

    def _append(self, record: dict[str, Any]) -> None:
        if self.spool is None:
            return
        try:
            if self._file is None:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.spool, "a", encoding="utf-8")
            # One write of one whole line, flushed: a reader never sees half a record, except after a crash
            # mid-write (the reader skips a last line without its newline).
            self._file.write(json.dumps({"t": int(time.time() * 1000), **record}, allow_nan=True) + "\n")
            self._file.flush()
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        """A spool that cannot be written (a full disk) costs metrics, never the training: said once, then silent."""
        self.lost += 1
        if self.lost == 1:
            print(f"warning: cannot write the tracking spool {self.spool} ({exc.strerror or exc}); metrics from here "
                  "on are not tracked", flush=True)

    def metrics(self, values: dict[str, float], step: int | None = None, model_sha256: str = "") -> None:
        """`model_sha256`: metrics of the logged model with these weights (an eval's), linked to it in MLflow."""
        self._append({"op": "metrics", "step": int(step or 0), "values": {k: float(v) for k, v in values.items()},
                      **({"model_sha256": model_sha256} if model_sha256 else {})})

    def model(self, path: str, name: str, tags: dict[str, str], params: dict[str, str],
              recipe: dict[str, Any] | None = None) -> None:
        """The weights file `path` as an MLflow logged model of the stage's run, with `recipe` (redacted: what builds
        the model) as its recipe.json; made when the spool is forwarded, tags[contract.TAG_WEIGHTS] names it for the
        metrics later linked to it."""
        self._append({"op": "model", "path": str(Path(path).resolve()), "name": name,
                      "tags": {k: str(v) for k, v in tags.items()}, "params": {k: str(v) for k, v in params.items()},
                      **({"recipe": recipe} if recipe else {})})

    def params(self, values: dict[str, str]) -> None:
        """MLflow params: set once per key (a new key for each new thing, e.g. segment.K.world_size)."""
        self._append({"op": "params", "values": {k: str(v) for k, v in values.items()}})

    def tags(self, values: dict[str, str]) -> None:
        self._append({"op": "tags", "values": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload `path` (a file the stage keeps, e.g. model.pt) when the spool is forwarded."""
        self._append({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def text(self, text: str, artifact_file: str) -> None:
        """A small text artifact: written beside the spool now, uploaded when forwarded."""
        if self.spool is None:
            return
        path = self.spool.parent / "files" / artifact_file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            self._lost(exc)
            return
        parent = str(Path(artifact_file).parent)
        self.artifact(str(path), None if parent == "." else parent)

    def restart(self, restart: int, start: int, why: str = "") -> None:
        """A restarted attempt (torchrun, a Slurm requeue, Ray Train's FailureConfig) on the stage's run: tag
        filipctl.restarts, filipctl.restart.K = why (when known), metric `restarts` at the step it resumed from."""
        tags = {"filipctl.restarts": str(restart)}
        if why:
            tags[f"filipctl.restart.{restart}"] = f"from step {start}: {why}"[:1000]
        self.tags(tags)
        self.metrics({"restarts": restart}, step=start)

    def last_step(self, metric: str) -> int:
        """The highest step at which `metric` was logged to this spool so far (by an earlier attempt), 0 if none."""
        if self.spool is None or not self.spool.is_file():
            return 0
        last = 0
        with open(self.spool, encoding="utf-8", errors="replace") as f:
            for line in f:
                if f'"{metric}"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("op") == "metrics" and metric in record.get("values", {}):
                    last = max(last, int(record.get("step", 0)))
        return last

    def sync(self) -> None:
        """Make every record appended so far durable (fsync): called at each checkpoint and at the end."""
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                self._lost(exc)
