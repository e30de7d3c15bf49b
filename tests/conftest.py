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


@pytest.fixture
def smoke_overrides(tmp_path: Path) -> list[str]:
    """The smoke recipe made smaller still, with every output under tmp_path."""
    sets = {
        "train.steps": "20",
        "train.checkpoint_every": "10",
        "train.log_every": "5",
        "optim.warmup_steps": "5",
        "data.synthetic.train_samples": "600",
        "data.synthetic.eval_samples": "100",
        "data.synthetic.samples_per_shard": "200",
        "data.train": str(tmp_path / "data" / "train"),
        "data.eval": str(tmp_path / "data" / "eval"),
        "output_dir": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    out: list[str] = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    """--set arguments for the ablation tests: tiny step counts and sample sets, every output under tmp_path."""
    sets = {"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 2, "optim.warmup_steps": 1,
            "data.synthetic.train_samples": 200, "data.synthetic.eval_samples": 40,
            "data.synthetic.samples_per_shard": 100, "data.train": tmp_path / "data" / "train",
            "data.eval": tmp_path / "data" / "eval", "output_dir": tmp_path / "runs",
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
