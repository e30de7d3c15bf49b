"""A pretraining stage continued at another world size (issue 22), on the local backend with real DeepSpeed:
the same stage folder, the global batch kept (accumulation at fewer workers, half micro-batches at more), model and
optimizer state re-partitioned, the loader's epoch dealt to the new ranks. Each run stops after a checkpoint
(FILIPCTL_STOP_AT_STEP) and the next `filipctl run` continues it with another train.workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, longer_overrides, run_cli, tiny_in

STOPPED = "stopped after the checkpoint of step"


def _pretrain_run(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("filip")
    (run,) = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
    return client, run


def _segments(folder: Path) -> list[dict]:
    (path,) = (folder / "runs").glob("stages/pretrain-*/segments.json")
    return json.loads(path.read_text())


def _run_in_segments(folder: Path, overrides: list[str], plan: list[tuple[int, int | None]]) -> list[str]:
    """`plan`: (workers, stop at step or None for the end) per `filipctl run`; -> each run's stdout."""
    outs = []
    for workers, stop in plan:
        env = {"FILIPCTL_STOP_AT_STEP": str(stop)} if stop else {}
        res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *overrides, "--set", f"train.workers={workers}",
                      cwd=folder, env=env, timeout=900)
        if stop:
            assert res.returncode != 0 and f"{STOPPED} {stop}" in res.stdout + res.stderr, res.stdout + res.stderr
            assert "Traceback" not in res.stderr
        else:
            assert res.returncode == 0, res.stdout + res.stderr
        outs.append(res.stdout + res.stderr)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(2, 1, 2), (2, 4, 2)], ids=["2-1-2", "2-4-2"])
def test_a_run_continues_at_another_size_with_the_loss_curve_of_the_straight_run(local_run: dict, tmp_path: Path,
                                                                                 sizes: tuple[int, int, int]) -> None:
    longer = [*longer_overrides(tmp_path), "--set", "eval.enabled=false"]
    first, second, third = sizes
    outs = _run_in_segments(tmp_path, longer, [(first, 20), (second, 30), (third, None)])
    assert f"world size {first} -> {second} from step 20" in outs[1], outs[1]
    assert f"world size {second} -> {third} from step 30" in outs[2], outs[2]
    assert "re-partitioned for" in outs[1] and "data restarts" not in outs[1] + outs[2]
    # one stage folder, three segments recorded in it and on the stage's MLflow run
    segments = _segments(tmp_path)
    assert [(s["world_size"], s["start_step"]) for s in segments] == [(first, 0), (second, 20), (third, 30)]
    client, run = _pretrain_run(tmp_path)
    params = run.data.params
    assert [params[f"segment.{k}.world_size"] for k in range(3)] == [str(first), str(second), str(third)]
    assert [params[f"segment.{k}.start_step"] for k in range(3)] == ["0", "20", "30"]
    assert run.info.status == "FINISHED" and run.data.params["global_batch"] == "64"
    # the loss curve: bitwise the straight 2-worker run's up to the change, then within float noise of it (the
    # same samples, model and optimizer state; only the order of sums differs)
    straight = local_run["losses"]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert set(history) == set(straight)
    for step in (5, 10, 15, 20):
        assert history[step] == straight[step], (step, history[step], straight[step])
    after = [abs(history[s] - straight[s]) for s in (25, 30, 35, 40)]
    assert max(after) < 1e-3, after
    # not vacuous: the curve moves far more between logged steps than the change moved it
    assert min(abs(straight[s] - straight[s - 5]) for s in (25, 30, 35, 40)) > 100 * max(after)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_each_zero_stage_continues_on_one_worker(tmp_path: Path, zero: int) -> None:
    """ZeRO 1, 2, 3: checkpoint at step 2 on 2 workers, continue on 1 (accumulating 2 micro-batches) to step 4."""
    overrides = [*tiny_in(tmp_path), "--set", f"train.zero_stage={zero}", "--set", "eval.enabled=false",
                 "--set", "train.log_every=1"]
    outs = _run_in_segments(tmp_path, overrides, [(2, 2), (1, None)])
    assert "world size 2 -> 1 from step 2" in outs[1] and "re-partitioned for 1" in outs[1], outs[1]
    result = json.loads(next((tmp_path / "runs").glob("stages/pretrain-*/result.json")).read_text())["metrics"]
    assert result["steps_run"] == 2 and result["final_loss"] == result["final_loss"]
    client, run = _pretrain_run(tmp_path)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_checkpoint_of_another_global_batch_or_zero_stage_is_refused_and_kept(tmp_path: Path) -> None:
    """Checkpoints put into a stage folder by hand from another run: one line naming the difference, nothing
    overwritten."""
    import shutil

    base = [*tiny_in(tmp_path), "--set", "eval.enabled=false"]
    _run_in_segments(tmp_path, base, [(2, 2)])
    (source,) = (tmp_path / "runs").glob("stages/pretrain-*")
    # (another model shape: tests/test_reshard.py, which names the parameter and both shapes)
    for change, expected in ((["--set", "train.global_batch=32"], "saved with global batch 64"),
                             (["--set", "train.zero_stage=3"], "written with ZeRO stage 2")):
        before = {p.name for p in (tmp_path / "runs").glob("stages/pretrain-*")}
        # the other recipe's stage folder (stopped after its own first checkpoint), the first run's checkpoints
        # copied over its own
        _run_in_segments(tmp_path, [*base, *change], [(2, 2)])
        new = [p for p in (tmp_path / "runs").glob("stages/pretrain-*") if p.name not in before]
        assert len(new) == 1
        shutil.rmtree(new[0] / "checkpoints", ignore_errors=True)
        shutil.copytree(source / "checkpoints", new[0] / "checkpoints")
        files = {p: p.stat().st_mtime_ns for p in (new[0] / "checkpoints").rglob("*") if p.is_file()}
        res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *base, *change, cwd=tmp_path)
        assert res.returncode != 0 and expected in res.stdout + res.stderr, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        assert {p: p.stat().st_mtime_ns for p in (new[0] / "checkpoints").rglob("*") if p.is_file()} == files
