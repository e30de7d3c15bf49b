"""The Ray backend on a real local Ray (2 CPU workers), checkpoints on S3 served by moto on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.xdist_group("ray")  # its tests on one worker, so that the scenario runs once


# Session scope: a test worker may run other modules' tests between these, which would end a module fixture.
@pytest.fixture(scope="session")
def ray_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run tests/ray_scenario.py once (about 3 minutes) and share what it saw."""
    tmp_path = tmp_path_factory.mktemp("ray")
    result_file = tmp_path / "result.json"
    # A loopback-only network namespace: Ray binds every interface otherwise.
    cmd = f"ip link set lo up && exec {sys.executable} {ROOT / 'tests/ray_scenario.py'} {tmp_path} {result_file}"
    proc = subprocess.run(["unshare", "--net", "bash", "-c", cmd], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and result_file.exists(), proc.stderr[-5000:]
    return json.loads(result_file.read_text())


@pytest.mark.slow
def test_ray_end_to_end_worker_killed_resumes_from_s3_checkpoint(ray_result: dict) -> None:
    r = ray_result
    assert r["returncode"] == 0, r["stderr"][-5000:]
    assert "zeroshot_top1" in r["stdout"]  # eval ran after pretraining
    # A worker was killed after the first checkpoint reached S3 ...
    assert r["killed"], "no checkpoint appeared in S3 while two workers were running"
    # ... and the run restored that checkpoint instead of starting over, then ran to the last step.
    resumed = re.findall(r"resumed from ray checkpoint \S+ \(step(\d+)\)", r["pretrain_log"])
    assert resumed, r["pretrain_log"][-5000:]
    step = int(resumed[-1])
    print(f"killed worker {r['killed']}; resumed at step {step}; run took {r['elapsed_s']:.0f} s")
    assert 10 <= step < r["steps"]
    assert f"step     {r['steps']}/{r['steps']}" in r["pretrain_log"]
    assert r["pretrain_json"]["steps_run"] == r["steps"] - step
    assert r["model_exists"]
    # Checkpoints are on S3, each holding every worker's ZeRO shard.
    ckpt_dirs = {f.rsplit("/", 2)[0] for f in r["s3_files"] if "/checkpoint_" in f}
    assert len(ckpt_dirs) >= r["steps"] // 10
    names = {f.rsplit("/", 1)[1] for f in r["s3_files"]}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    # The S3 secret came from the environment and went nowhere filipctl writes.
    assert r["leaked"] == []
    # `filipctl status` reads the Ray run and its stages from MLflow.
    done = r["cancel"]["first_run_status"]
    assert done["backend"] == "ray" and done["state"] == "COMPLETED", done
    assert [s["state"] for s in done["stages"]] == ["COMPLETED"] * 3


@pytest.mark.slow
def test_standing_cluster_too_small_is_refused_before_anything_is_written(ray_result: dict) -> None:
    for attempt in ray_result["too_many"]:  # by GCS address, then by ray:// (Ray Client)
        assert attempt["rc"] == 2 and "8 workers" in attempt["stderr"] and "CPU: needs 8, has 2" in attempt["stderr"]
        assert "Traceback" not in attempt["stderr"] and attempt["written"] == [], attempt
        assert attempt["seconds"] < 60, attempt
        print(f"too many workers refused in {attempt['seconds']:.1f} s: {attempt['stderr'].strip()}")


@pytest.mark.slow
def test_ray_cancel_stops_the_train_workers(ray_result: dict) -> None:
    """The long run is on the standing cluster, joined through ray:// (Ray Client)."""
    c = ray_result["cancel"]
    assert c["workers_running"] >= 2, c  # it was cancelled mid-training
    assert c["cancel_rc"] == 0 and "pretrain" in c["cancel_stdout"] and "eval" in c["cancel_stdout"], c
    assert c["run_rc"] != 0 and "stage pretrain cancelled" in c["run_stderr"], c["run_stderr"]
    assert c["workers_left"] == []  # no Ray Train worker outlives the cancel
    assert c["status"]["state"] == "CANCELLED"
    # data was done by the first run and reused: CACHED; eval was never submitted and never will run: SKIPPED
    assert [s["state"] for s in c["status"]["stages"]] == ["CACHED", "CANCELLED", "SKIPPED"]


@pytest.mark.parametrize("sets, message", [
    (["cluster.ray.address=127.0.0.1:9"], "nothing answers at 127.0.0.1:9"),
    (["cluster.ray.address=ray://127.0.0.1:9"], "nothing answers at 127.0.0.1:9"),
    (["cluster.ray.workers=64"], "64 workers"),
])
def test_unreachable_cluster_or_too_many_workers_fails_fast(tmp_path: Path, sets: list[str], message: str) -> None:
    args = [x for s in sets for x in ("--set", s)]
    t0 = time.time()
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "ray", *args, cwd=tmp_path, timeout=120)
    assert time.time() - t0 < 30  # a clear answer, not a hang
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing tracked, nothing written


def test_detach_is_refused_without_a_scheduler(tmp_path: Path) -> None:
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "ray", "--detach", cwd=tmp_path)
    assert res.returncode == 2 and "--detach needs a scheduler" in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("profile, available, short", [
    ({"workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 2, "GPU": 1}}, {"CPU": 16, "GPU": 4}, None),
    ({"workers": 4, "use_gpu": True}, {"CPU": 16, "GPU": 2}, "GPU: needs 4, has 2"),
    ({"workers": 2, "resources_per_worker": {"CPU": 4}}, {"CPU": 6}, "CPU: needs 8, has 6"),
    ({"workers": 2}, {"CPU": 2}, None),
])
def test_missing_resources_counts_what_ray_train_reserves(profile: dict, available: dict, short: str | None) -> None:
    from filipctl.backends.ray import missing_resources
    from filipctl.schema import RayProfile

    problem = missing_resources(RayProfile(**profile), available)
    assert problem == short if short is None else short in problem
