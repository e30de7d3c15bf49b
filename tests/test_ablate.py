"""`filipctl ablate` end to end on the CPU (tiny step counts): the table, the MLflow parent, a stage graph
that never trains the same thing twice (rerun, one more component, Ctrl-C then the same command)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import FILIPCTL, ROOT, run_cli

pytestmark = pytest.mark.slow

ABLATION = str(ROOT / "recipes/ablation.yaml")


def _client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _ablations(client):
    exp = client.get_experiment_by_name("filip")
    return exp.experiment_id, client.search_runs([exp.experiment_id], "tags.`filipctl.kind` = 'ablation'",
                                                 order_by=["attributes.start_time DESC"])


def _stage_runs(client, exp_id: str, variant_run: str):
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{variant_run}'")


def _to_run(output: str) -> int:
    line = next(ln for ln in output.splitlines() if " to run" in ln and "stages" in ln)
    return int(line.split(" stages, ")[1].split(" to run")[0])


def test_ablate_table_mlflow_and_a_graph_that_trains_nothing_twice(tmp_path: Path, tiny: list[str]) -> None:
    # 1. baseline, +aug, +late_interaction, +aug+late_interaction: data once, then pretrain -> eval each.
    res = run_cli("ablate", ABLATION, "--components", "aug,late_interaction", *tiny, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _to_run(res.stdout) == 9  # 1 data + 4 x (pretrain, eval)
    for setting in ("baseline", "+aug", "+late_interaction", "+aug+late_interaction"):
        assert setting in res.stdout
    assert "I2T R@1" in res.stdout and "zero-shot" in res.stdout

    client = _client(tmp_path)
    exp_id, (parent,) = _ablations(client)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation.json", "ablation.png"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "ablation.json", str(tmp_path))).read_text())
    assert [r["setting"] for r in table["rows"]] == ["baseline", "+aug", "+late_interaction", "+aug+late_interaction"]
    assert parent.data.tags["mlflow.note.content"].startswith("### ") and "| +aug |" in parent.data.tags["mlflow.note.content"]
    variants = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(v.data.tags["filipctl.variant"] for v in variants) == sorted(r["setting"] for r in table["rows"])
    for v in variants:  # each variant's eval metrics on the variant run itself, to compare side by side
        row = next(r for r in table["rows"] if r["setting"] == v.data.tags["filipctl.variant"])
        assert v.data.metrics["i2t_R1"] == pytest.approx(row["i2t_R1"]) and v.info.status == "FINISHED"
    data_jobs = {s.data.tags.get("filipctl.job_id") for v in variants for s in _stage_runs(client, exp_id, v.info.run_id)
                 if s.data.tags["filipctl.stage"] == "data"}
    assert len(data_jobs) == 1  # one data stage, shared by the four variants

    # 2. The same command again trains nothing: every stage is reused and shown as cached.
    t0 = time.monotonic()
    res = run_cli("ablate", ABLATION, "--components", "aug,late_interaction", *tiny, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0 and _to_run(res.stdout) == 0, res.stdout + res.stderr
    assert res.stdout.count("cached:") == 9
    _, (again, _first) = _ablations(client)
    for v in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{again.info.run_id}'"):
        assert all(s.data.tags.get("filipctl.cached") == "true" for s in _stage_runs(client, exp_id, v.info.run_id))
    print(f"rerun with everything cached: {elapsed:.1f} s")

    # 3. One more component: only the new variants train (+token_reduction, and all three together).
    res = run_cli("ablate", ABLATION, "--components", "aug,late_interaction,token_reduction", *tiny, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _to_run(res.stdout) == 4 and "+aug+late_interaction+token_reduction" in res.stdout


def test_ablate_interrupted_then_rerun_runs_only_what_is_missing(tmp_path: Path, tiny: list[str]) -> None:
    longer = [*tiny, "--set", "train.steps=40", "--set", "train.checkpoint_every=5"]
    res = run_cli("ablate", ABLATION, "--components", "image_aug", *tiny, "--dry-run", cwd=tmp_path)
    assert res.returncode == 0 and _to_run(res.stdout) == 5 and not (tmp_path / "runs").exists(), res.stdout
    proc = subprocess.Popen([*FILIPCTL, "ablate", ABLATION, "--components", "image_aug", *longer], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Wait until the first variant is done and the second one's pretraining has a checkpoint.
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        done = list((tmp_path / "runs" / "stages").glob("eval-*/done.json"))
        ckpt = [p for p in (tmp_path / "runs" / "stages").glob("pretrain-*/checkpoints/latest")
                if not (p.parent.parent / "done.json").exists()]
        if done and ckpt:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the ablation ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err, err
    finished = len(list((tmp_path / "runs" / "stages").glob("*/done.json")))
    assert 3 <= finished < 5

    res = run_cli("ablate", ABLATION, "--components", "image_aug", *longer, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _to_run(res.stdout) == 5 - finished and res.stdout.count("cached:") == finished
    pretrain_log = next(p for p in (tmp_path / "runs" / "stages").glob("pretrain-*/logs/pretrain.log")
                        if "resumed from" in p.read_text())
    assert "resumed from" in pretrain_log.read_text()  # the interrupted pretraining went on from its checkpoint
