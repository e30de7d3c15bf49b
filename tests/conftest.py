from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILIPCTL = [sys.executable, "-m", "filipctl.cli"]


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([*FILIPCTL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def overrides_in(folder: Path, **changes: object) -> list[str]:
    """--set arguments for the smoke recipe made smaller still (20 steps), every output under `folder`;
    `changes` (recipe key -> value) on top."""
    sets = {"train.steps": 20, "train.checkpoint_every": 10, "train.log_every": 5, "optim.warmup_steps": 5,
            "data.synthetic.train_samples": 600, "data.synthetic.eval_samples": 100,
            "data.synthetic.samples_per_shard": 200, "data.train": folder / "data" / "train",
            "data.eval": folder / "data" / "eval", "output_dir": folder / "runs",
            "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", **changes}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture
def smoke_overrides(tmp_path: Path) -> list[str]:
    """The smoke recipe made smaller still, with every output under tmp_path."""
    return overrides_in(tmp_path)


def tiny_in(folder: Path, **changes: object) -> list[str]:
    """--set arguments for the ablation tests: tiny step counts and sample sets, every output under `folder`;
    `changes` (recipe key -> value) on top."""
    sets = {"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 2, "optim.warmup_steps": 1,
            "data.synthetic.train_samples": 200, "data.synthetic.eval_samples": 40,
            "data.synthetic.samples_per_shard": 100, "data.train": folder / "data" / "train",
            "data.eval": folder / "data" / "eval", "output_dir": folder / "runs",
            "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", **changes}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """tiny_in(tmp_path)."""
    return tiny_in(tmp_path)


def longer_overrides(folder: Path) -> list[str]:
    """The recipe of the suite's one straight local training run (tests that compare a loss curve with it use
    these same values): smoke_overrides with 40 steps, 2 loader workers per rank and both augmentations."""
    sets = {"train.steps": 40, "train.checkpoint_every": 10, "train.log_every": 5, "optim.warmup_steps": 5,
            "data.synthetic.train_samples": 600, "data.synthetic.eval_samples": 100,
            "data.synthetic.samples_per_shard": 100, "data.loader_workers": 2, "data.augment": "true",
            "data.text_augment": "true", "data.train": folder / "data" / "train", "data.eval": folder / "data" / "eval",
            "output_dir": folder / "runs", "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}"}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="session")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real, uninterrupted local run (data -> 2-worker DeepSpeed pretraining -> eval), made once for the whole
    test session, pytest-xdist workers included (the first one to need it makes it under a file lock, the others
    read what it left): tests/test_cli.py checks it and resumes against its loss curve, the Slurm and Ray tests
    compare their curves with it. -> {"folder", "uri", "res", "losses": {step: loss}, "pretrain_run"}"""
    import fcntl
    import json

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's folder, every worker's
    folder = shared / "local_run"
    made = shared / "local_run.json"
    with open(shared / "local_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not made.exists():
            folder.mkdir(exist_ok=True)
            res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *longer_overrides(folder), cwd=folder)
            assert res.returncode == 0, res.stdout + res.stderr
            from mlflow.tracking import MlflowClient

            uri = f"sqlite:///{folder / 'mlflow.db'}"
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("filip")
            (pre,) = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
            losses = {m.step: m.value for m in client.get_metric_history(pre.info.run_id, "loss")}
            made.write_text(json.dumps({"uri": uri, "stdout": res.stdout, "stderr": res.stderr,
                                        "losses": list(losses.items()), "pretrain_run": pre.info.run_id}))
    run = json.loads(made.read_text())
    res = subprocess.CompletedProcess([], 0, run["stdout"], run["stderr"])
    return {"folder": folder, "uri": run["uri"], "res": res, "losses": {int(k): v for k, v in run["losses"]},
            "pretrain_run": run["pretrain_run"]}
