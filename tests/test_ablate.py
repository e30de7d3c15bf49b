"""`filipctl ablate` through its real control side (graph, executor, runner, the MLflow sink on a real sqlite
store, the table, markdown and chart) with jobs played by the in-process TEST backend: the table, the MLflow
parent, a graph that never trains the same thing twice (rerun, one more component, Ctrl-C then the same
command). Slurm holding and cancelling dependent jobs is tested on the real cluster in tests/test_slurm_backend.py
and tests/test_slurm.py; real Ctrl-C and resume of a training in tests/test_cli.py."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from rich.console import Console

from filipctl.backends.base import JobRequest
from filipctl.errors import FilipctlError
from filipctl.orchestration.ablation import run_ablation
from filipctl.recipes import load_recipe
from filipctl.states import State
from tests.conftest import ROOT, run_cli
from tests.inprocess_backend import InProcessTestBackend

ABLATION = str(ROOT / "recipes/ablation.yaml")


def recipe(tmp_path: Path):
    return load_recipe(ABLATION, [f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])


def eval_metrics(request: JobRequest) -> dict[str, float]:
    """Each stage its own figures (from its folder's name), so that the table has something to compare."""
    x = zlib.crc32(request.run_dir.root.name.encode()) % 1000 / 1000
    if request.stage.name != "eval":
        return {"final_loss": 1 + x} if request.stage.name == "pretrain" else {"train_pairs": 600.0}
    return {"i2t_R1": x, "t2i_R1": x / 2, "i2t_R5": x, "t2i_R5": x, "zeroshot_top1": 1 - x, "finegrained_R1": x,
            "pointing_acc": x}


def ablate(tmp_path: Path, components: list[str], backend: InProcessTestBackend, seeds: list[int] = [0]):
    console = Console(file=open(tmp_path / "console.txt", "a"), width=200)
    return run_ablation(recipe(tmp_path), ABLATION, components, seeds, console, backend=backend)


def client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return c, c.get_experiment_by_name("filip").experiment_id


def children(c, exp_id: str, run_id: str):
    return c.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_ablate_table_mlflow_and_a_graph_that_trains_nothing_twice(tmp_path: Path) -> None:
    # 1. baseline, +aug, +late_interaction, +aug+late_interaction: data once, then pretrain -> eval each.
    backend = InProcessTestBackend(metrics=eval_metrics, max_stages=2)
    result = ablate(tmp_path, ["aug", "late_interaction"], backend)
    assert len(backend.submitted) == 9 and [n.split("-")[0] for n in backend.submitted].count("data") == 1
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "+aug", "+late_interaction", "+aug+late_interaction"]
    assert not result["failed"]
    base = rows["baseline"]
    assert rows["+aug"]["i2t_R1_delta"] == pytest.approx(rows["+aug"]["i2t_R1"] - base["i2t_R1"])

    c, exp_id = client(tmp_path)
    parent = c.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["filipctl.kind"] == "ablation"
    assert {"ablation.md", "ablation.json", "ablation.png"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    table = json.loads(Path(c.download_artifacts(parent.info.run_id, "ablation.json", str(tmp_path))).read_text())
    assert [r["setting"] for r in table["rows"]] == list(rows)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("### ") and "| +aug |" in note
    assert (Path(result["chart"])).is_file() and Path(result["chart"]).read_bytes()[:4] == b"\x89PNG"
    variants = children(c, exp_id, parent.info.run_id)
    assert sorted(v.data.tags["filipctl.variant"] for v in variants) == sorted(rows)
    for v in variants:  # each variant's eval metrics on the variant run itself, to compare side by side
        assert v.data.metrics["i2t_R1"] == pytest.approx(rows[v.data.tags["filipctl.variant"]]["i2t_R1"])
        assert v.info.status == "FINISHED"
        stages = children(c, exp_id, v.info.run_id)
        assert {s.data.tags["filipctl.stage"]: s.info.status for s in stages} == {
            "data": "FINISHED", "pretrain": "FINISHED", "eval": "FINISHED"}
    data_jobs = {s.data.tags.get("filipctl.job_id") for v in variants for s in children(c, exp_id, v.info.run_id)
                 if s.data.tags["filipctl.stage"] == "data"}
    assert len(data_jobs) == 1  # one data stage, shared by the four variants
    # a shared stage's metrics reach every variant's run of it (the job itself logged on the first one only)
    pre_metrics = [s.data.metrics.get("final_loss") for v in variants for s in children(c, exp_id, v.info.run_id)
                   if s.data.tags["filipctl.stage"] == "data"]
    assert len(pre_metrics) == 4

    # 2. The same command again trains nothing: every stage is reused and tagged cached; the table is the same.
    again = InProcessTestBackend(metrics=eval_metrics)
    result2 = ablate(tmp_path, ["aug", "late_interaction"], again)
    assert again.submitted == [] and result2["rows"] == result["rows"]
    for v in children(c, exp_id, result2["run_id"]):
        assert all(s.data.tags.get("filipctl.cached") == "true" for s in children(c, exp_id, v.info.run_id))

    # 3. One more component: only the new variants train (+token_reduction, and all three together).
    more = InProcessTestBackend(metrics=eval_metrics, max_stages=2)
    result3 = ablate(tmp_path, ["aug", "late_interaction", "token_reduction"], more)
    assert len(more.submitted) == 4 and "+aug+late_interaction+token_reduction" in {r["setting"] for r in result3["rows"]}


def test_a_failed_variant_is_named_in_the_table_and_the_others_finish(tmp_path: Path) -> None:
    backend = InProcessTestBackend(metrics=eval_metrics, max_stages=2)
    original = backend._advance

    def advance(job):  # the +aug pretraining fails on its node
        if job.request.stage.name == "pretrain" and '"augment": true' in job.request.run_dir.recipe.read_text():
            job.outcome = State.FAILED
        return original(job)

    backend._advance = advance  # type: ignore[method-assign]
    result = ablate(tmp_path, ["aug"], backend)
    assert result["failed"] == ["+aug"]
    rows = {r["setting"]: r for r in result["rows"]}
    assert rows["baseline"]["i2t_R1"] is not None and rows["+aug"]["i2t_R1"] is None
    c, exp_id = client(tmp_path)
    assert c.get_run(result["run_id"]).info.status == "FAILED"
    status = {v.data.tags["filipctl.variant"]: v.info.status for v in children(c, exp_id, result["run_id"])}
    assert status == {"baseline": "FINISHED", "+aug": "FAILED"}


def test_ablate_interrupted_then_rerun_runs_only_what_is_missing(tmp_path: Path) -> None:
    res = run_cli("ablate", ABLATION, "--components", "image_aug", "--set", f"output_dir={tmp_path / 'runs'}",
                  "--dry-run", cwd=tmp_path)
    assert res.returncode == 0 and "2 stages" not in res.stdout and "5 to run" in res.stdout, res.stdout
    assert not (tmp_path / "runs").exists()

    class CtrlC(InProcessTestBackend):
        def poll(self, handles):  # Ctrl-C arrives once the second pretraining runs
            if sum(j.request.stage.name == "pretrain" for j in self.jobs.values()) == 2:
                raise KeyboardInterrupt
            return super().poll(handles)

    backend = CtrlC(metrics=eval_metrics, max_stages=1)
    with pytest.raises(FilipctlError, match="interrupted: cancelled .*pretrain"):
        ablate(tmp_path, ["image_aug"], backend)
    assert [j.cancelled for j in backend.jobs.values()] == [False, False, False, True]
    c, exp_id = client(tmp_path)
    (parent,) = c.search_runs([exp_id], "tags.`filipctl.kind` = 'ablation'")
    assert parent.info.status == "KILLED"
    finished = len(list((tmp_path / "runs" / "stages").glob("*/done.json")))
    assert finished == 3  # data, one pretraining and its eval

    rerun = InProcessTestBackend(metrics=eval_metrics)
    result = ablate(tmp_path, ["image_aug"], rerun)
    assert [n.split("-")[0] for n in rerun.submitted] == ["pretrain", "eval"] and not result["failed"]
