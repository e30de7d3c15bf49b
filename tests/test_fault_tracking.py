"""Tracking off the critical path, faults injected for real: an `mlflow server` killed mid-training (and started
again later), a sqlite store held by another writer for 90 s. Training must finish at its own pace and, once the
store answers again, every step's loss must be in MLflow with the step and time it was logged at, no run left
RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from filipctl.contract import free_port
from tests.conftest import FILIPCTL, ROOT, overrides_in, run_cli

pytestmark = pytest.mark.slow
STEPS = 20


def _sets(tmp_path: Path, uri: str, **extra: object) -> list[str]:
    return overrides_in(tmp_path, **{"train.steps": STEPS, "train.log_every": 2, "optim.warmup_steps": 2,
                                     "data.synthetic.train_samples": 200, "data.synthetic.eval_samples": 40,
                                     "data.synthetic.samples_per_shard": 100, "eval.enabled": "false",
                                     "tracking.uri": uri, **extra})


def _start_cli(tmp_path: Path, sets: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*FILIPCTL, "run", str(ROOT / "recipes/smoke.yaml"), *sets], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})


def _wait_for_training(tmp_path: Path, cli: subprocess.Popen, timeout: float = 300) -> None:
    """Until pretraining logged its first loss (its events file names a step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for events in (tmp_path / "runs").glob("stages/pretrain-*/logs/pretrain.events.jsonl"):
            if any("loss" in json.loads(line) for line in events.read_text().splitlines() if line.strip()):
                return
        assert cli.poll() is None, cli.communicate()
        time.sleep(0.5)
    raise AssertionError("pretraining logged no step in time")


class MlflowServer:
    """A real `mlflow server` on a sqlite store, started and killed (SIGKILL, no goodbye) by the test."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        raise AssertionError("mlflow server did not answer in 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its gunicorn/uvicorn workers
            self.proc.wait()


def _check_everything_arrived(uri: str, before: float, down_since: float | None = None) -> None:
    """Every logged step's loss is in the pretrain run, with the time it was logged at; no run still open. So are
    the node's system metrics (jobs/system_metrics.py), sampled on through the outage (`down_since`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("filip")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    (pre,) = [r for r in runs if r.data.tags.get("filipctl.stage") == "pretrain"]
    history = client.get_metric_history(pre.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(2, STEPS + 1, 2))
    assert all(m.timestamp / 1000 < before for m in history)  # logged while training, not when sent
    assert "final_loss" in pre.data.metrics and "model" in {a.path for a in client.list_artifacts(pre.info.run_id)}
    (cpu,) = [k for k in pre.data.metrics if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")]
    samples = client.get_metric_history(pre.info.run_id, cpu)
    assert sorted(m.step for m in samples) == list(range(len(samples))) and all(m.timestamp / 1000 < before
                                                                                for m in samples)
    assert down_since is None or max(m.timestamp for m in samples) / 1000 > down_since


def test_a_tracking_server_down_for_good_costs_no_training(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path)
    server.start()
    try:
        # MLflow's own retries reduced (the forwarder retries instead): the outage outlasts them many times.
        cli = _start_cli(tmp_path, _sets(tmp_path, server.uri, **{"tracking.drain_s": 3}),
                         env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        _wait_for_training(tmp_path, cli)
        server.kill()
        down_at = time.time()
        out, err = cli.communicate(timeout=600)
        assert cli.returncode == 0, out + err
        assert (tmp_path / "runs").glob("stages/pretrain-*/model.pt")
        assert "has not taken" in out and "filipctl sync" in out, out

        # Still down: status says what waits and does not fail.
        res = run_cli("status", "--json", "--tracking-uri", server.uri, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "does not answer" in res.stderr
        (row,) = json.loads(res.stdout)
        pre = next(s for s in row["stages"] if s["stage"] == "pretrain")
        assert pre["state"] == "COMPLETED" and pre["tracking_behind"] > 0

        server.start()  # back, minutes of records later
        res = run_cli("sync", "--tracking-uri", server.uri, cwd=tmp_path)
        assert res.returncode == 0 and "sent" in res.stdout, res.stdout + res.stderr
        _check_everything_arrived(server.uri, down_at + 60, down_since=down_at)
        res = run_cli("status", "--json", "--tracking-uri", server.uri, cwd=tmp_path)
        assert all(s["tracking_behind"] == 0 for s in json.loads(res.stdout)[0]["stages"])
    finally:
        server.kill()


def test_a_store_locked_for_90_s_costs_no_training(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    cli = _start_cli(tmp_path, _sets(tmp_path, f"sqlite:///{db}", **{"tracking.drain_s": 1}))
    _wait_for_training(tmp_path, cli)
    holder = subprocess.Popen([sys.executable, "-c", (  # another writer holds the database for 90 s
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(90); c.execute('ROLLBACK')\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked_at = time.time()
        out, err = cli.communicate(timeout=600)
        ended = time.time()
        assert cli.returncode == 0, out + err
        assert ended - locked_at < 85, "training waited for the locked store"
        assert "has not taken" in out, out
        holder.wait(timeout=120)
        res = run_cli("status", "--tracking-uri", f"sqlite:///{db}", "--tracking-timeout", "30", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "behind" not in res.stdout, res.stdout
        _check_everything_arrived(f"sqlite:///{db}", ended)
    finally:
        if holder.poll() is None:
            holder.kill()
