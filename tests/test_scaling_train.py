"""The paper's efficient setting (fp16 on the wire, 25% of tokens) trains the smoke recipe for real."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_fp16_gather_with_25_percent_tokens_learns(tmp_path: Path, smoke_overrides: list[str]) -> None:
    sets = [*smoke_overrides, "--set", "train.steps=60", "--set", "train.log_every=10",
            "--set", "model.token_keep=0.25", "--set", "model.gather_dtype=fp16"]
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *sets, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gather fp16 keeping 25% of tokens" in res.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("filip")
    pre = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")[0]
    losses = [m.value for m in sorted(client.get_metric_history(pre.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # ln(64) = 4.16 is the loss of a model that cannot tell the 64 pairs of a global batch apart.
    assert losses[0] > 3.5 and losses[-1] < losses[0] - 1.0, losses
    ev = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'eval'")[0].data.metrics
    assert ev["zeroshot_top1"] > 2 * ev["chance_zeroshot_top1"], ev
    assert ev["t2i_R10"] > 5 * 10 * ev["chance_R1"], ev
