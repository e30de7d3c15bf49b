"""Execution state a person asks for often (`filipctl status`), kept where it is read without importing MLflow.

A small SQLite file (stdlib sqlite3) beside the MLflow store: `filipctl-state.db` next to a sqlite
store's file, else in the working directory. It mirrors what the control side's writer
(tracking.writer.Tracker) records: every run (pipeline, ablation, variant) and stage with its state
(filipctl.states.State), job, stage folder, key metric and times. MLflow stays the record; this is
its index, read in milliseconds where importing and querying MLflow takes seconds.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from filipctl.states import State

FILE = "filipctl-state.db"
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, experiment TEXT, kind TEXT, parent TEXT, name TEXT, recipe TEXT, backend TEXT,
    variant TEXT, state TEXT, started REAL, ended REAL);
CREATE INDEX IF NOT EXISTS runs_started ON runs (experiment, started);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT PRIMARY KEY, parent TEXT, stage TEXT, state TEXT, job_id TEXT DEFAULT '', key_metric TEXT,
    value REAL, ray_run TEXT DEFAULT '', started REAL, ended REAL);
CREATE INDEX IF NOT EXISTS stages_parent ON stages (parent, started);
"""
# Columns added after the first release: an older index gains them when a writer opens it.
ADDED = {"stages": {"folder": "TEXT DEFAULT ''", "stage_key": "TEXT DEFAULT ''", "running_since": "REAL"}}


def path_for(tracking_uri: str) -> Path:
    """Beside a sqlite MLflow store; for a server, in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]).parent / FILE
    return Path.cwd() / FILE


class StateStore:
    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        self.con = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        if create:
            self.con.executescript(SCHEMA)
        self._upgrade()

    def _upgrade(self) -> None:
        for table, columns in ADDED.items():
            have = {r[1] for r in self.con.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if have and name not in have:
                    try:
                        self.con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                    except sqlite3.OperationalError:  # a read-only index: readers do without the column
                        return

    @classmethod
    def open_for(cls, tracking_uri: str) -> "StateStore | None":
        """The store of a tracking URI for reading; None when nothing was recorded there yet."""
        path = path_for(tracking_uri)
        return cls(path, create=False) if path.is_file() else None

    # -- written by tracking.writer.Tracker ---------------------------------------------------------

    def add_run(self, run_id: str, experiment: str, kind: str, name: str, recipe: str, backend: str,
                parent: str = "", variant: str = "") -> None:
        self.con.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         (run_id, experiment, kind, parent, name, recipe, backend, variant, State.RUNNING.value,
                          time.time(), None))

    def add_stage(self, run_id: str, parent: str, stage: str, key_metric: str, folder: str = "",
                  stage_key: str = "") -> None:
        self.con.execute("INSERT OR REPLACE INTO stages (run_id, parent, stage, state, key_metric, started, folder, "
                         "stage_key) VALUES (?,?,?,?,?,?,?,?)",
                         (run_id, parent, stage, State.PENDING.value, key_metric, time.time(), folder, stage_key))

    def set_state(self, run_id: str, state: State) -> None:
        now = time.time()
        end = now if state.ended else None
        self.con.execute("UPDATE runs SET state = ?, ended = ? WHERE run_id = ?", (state.value, end, run_id))
        self.con.execute("UPDATE stages SET state = ?, ended = ? WHERE run_id = ?", (state.value, end, run_id))
        if state is State.RUNNING:  # a stage's duration counts from here, not from when it was queued
            self.con.execute("UPDATE stages SET running_since = ? WHERE run_id = ? AND running_since IS NULL",
                             (now, run_id))

    def set_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """The stage's key metric, when `metrics` has it."""
        row = self.con.execute("SELECT key_metric FROM stages WHERE run_id = ?", (run_id,)).fetchone()
        if row and row[0] in metrics:
            self.con.execute("UPDATE stages SET value = ? WHERE run_id = ?", (float(metrics[row[0]]), run_id))

    def set_stage(self, run_id: str, **fields: Any) -> None:
        """job_id, ray_run or value of a stage."""
        for key, value in fields.items():
            self.con.execute(f"UPDATE stages SET {key} = ? WHERE run_id = ?", (value, run_id))

    # -- read by filipctl status --------------------------------------------------------------------

    def top_runs(self, experiment: str, limit: int) -> list[dict[str, Any]]:
        cur = self.con.execute("SELECT * FROM runs WHERE experiment = ? AND kind IN ('pipeline', 'ablation') "
                               "ORDER BY started DESC LIMIT ?", (experiment, limit))
        return _rows(cur)

    def children(self, parent: str) -> list[dict[str, Any]]:
        return _rows(self.con.execute("SELECT * FROM runs WHERE parent = ? ORDER BY started", (parent,)))

    def run_state(self, run_id: str) -> State | None:
        """The recorded state of a run (pipeline, variant, ablation); None when the index does not know it."""
        row = self.con.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return State.parse(row[0]) if row else None

    def folders(self) -> list[str]:
        """Every stage folder recorded, newest first (where tracking spools may wait)."""
        cur = self.con.execute("SELECT folder, MAX(started) AS last FROM stages WHERE folder != '' GROUP BY folder "
                               "ORDER BY last DESC")
        return [r[0] for r in cur.fetchall()]

    def stages(self, parent: str) -> list[dict[str, Any]]:
        return _rows(self.con.execute("SELECT * FROM stages WHERE parent = ? ORDER BY started", (parent,)))


def _rows(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]
