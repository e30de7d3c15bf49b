"""The Slurm backend against the real two-node cluster that scripts/slurm-up.sh brings up (filip-n1, filip-n2).

No test double: jobs go through submitit and sbatch, states come from sacct, and the pretraining job
is a real DeepSpeed group of one task on each node (clusters/slurm.yaml), initialised from Slurm's
environment. A node lost in the middle of it: tests/test_slurm_lost_node.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from filipctl.contract import port_from_job_id
from tests.conftest import ROOT, longer_overrides, run_cli
from tests.slurm_util import hostnames, my_queue, sacct, slurm_cluster, wait_for  # noqa: F401 (slurm_cluster: autouse)

# One worker runs every test of the one test cluster (and conftest.local_run, shared with tests/test_cli.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def status_json(tmp_path: Path) -> list[dict]:
    res = run_cli("status", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def job_ids(row: dict) -> dict[str, str]:
    return {s["stage"]: s["job"] for s in row["stages"]}


SLURM = ["--cluster", "slurm"]


def test_smoke_recipe_end_to_end_on_slurm(tmp_path: Path, local_run: dict) -> None:
    # The recipe of the session's straight local run (conftest.local_run), to compare the loss curves below.
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *SLURM, *longer_overrides(tmp_path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "zeroshot_top1" in res.stdout and "queued: data = job" in res.stdout

    row = status_json(tmp_path)[0]
    assert row["backend"] == "slurm" and row["state"] == "COMPLETED"
    ids = job_ids(row)
    acct = {stage: sacct(job) for stage, job in ids.items()}
    assert all(a["state"] == "COMPLETED" for a in acct.values()), acct
    # afterok: each stage started only after the one before it ended.
    assert acct["pretrain"]["start"] >= acct["data"]["end"]
    assert acct["eval"]["start"] >= acct["pretrain"]["end"]
    # The pretraining job was one distributed group of a task on each node (both ranks logged, rank 0 trained to
    # the end); data and eval one task on one node.
    folder = Path(row["stages"][1]["folder"]) / "slurm"
    assert (folder / f"{ids['pretrain']}_1_log.err").exists()
    assert "step     40/40" in (folder / f"{ids['pretrain']}_0_log.out").read_text()
    assert hostnames(acct["pretrain"]["nodes"]) == ["filip-n1", "filip-n2"]
    assert all(len(hostnames(acct[stage]["nodes"])) == 1 for stage in ("data", "eval"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    pre = client.get_run(row["stages"][1]["run_id"])
    assert pre.data.tags["filipctl.job_id"].startswith(ids["pretrain"] + "@")
    # Each rank on its own node; the rendezvous on the first node of the allocation (not this login host), at the
    # job's own port (gloo over the bridge and two jobs at once: tests/test_slurm_backend.py).
    assert pre.data.tags["filipctl.hosts"] == "filip-n1,filip-n2"
    assert pre.data.tags["filipctl.rendezvous"] == f"filip-n1:{port_from_job_id(ids['pretrain'])}"
    # Each node's system metrics (jobs/system_metrics.py), named by Slurm's name for the node.
    assert {k.split("/")[1] for k in pre.data.metrics if k.startswith("system/")} == {"filip-n1", "filip-n2"}
    assert pre.data.metrics["final_loss"] > 0 and "logs" in {a.path for a in client.list_artifacts(pre.info.run_id)}

    # The same recipe as 2 local processes: the same world size and threads (1 per rank: Slurm's cpus_per_task on
    # the nodes, the machine's 2 cores shared by 2 ranks locally), so the same loss curve, bit for bit.
    from mlflow.tracking import MlflowClient as Client

    local_pre = Client(local_run["uri"]).get_run(local_run["pretrain_run"])
    curves = [{m.step: m.value for m in client.get_metric_history(pre.info.run_id, "loss")}, local_run["losses"]]
    assert curves[0] == curves[1] and sorted(curves[0]) == [5 * i for i in range(1, 9)]
    assert [r.data.tags["filipctl.world_size"] for r in (pre, local_pre)] == ["2", "2"]
    assert pre.data.tags["filipctl.torch_threads"] == local_pre.data.tags["filipctl.torch_threads"]
    assert len(set(curves[0].values())) == 8  # the curve moves: equality is not vacuous


def test_detach_then_cancel(tmp_path: Path, smoke_overrides: list[str]) -> None:
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *SLURM, *smoke_overrides,
                  "--set", "train.steps=2000", "--detach", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "detached" in res.stdout
    ids = job_ids(status_json(tmp_path)[0])
    wait_for(lambda: sacct(ids["pretrain"])["state"] == "RUNNING", 120, "pretraining to start")

    res = run_cli("cancel", cwd=tmp_path)
    assert res.returncode == 0 and "pretrain" in res.stdout and "eval" in res.stdout, res.stdout + res.stderr
    wait_for(lambda: sacct(ids["pretrain"])["state"] == "CANCELLED", 60, "pretrain to read CANCELLED")
    wait_for(lambda: sacct(ids["eval"])["state"] == "CANCELLED", 60, "eval to read CANCELLED")
    assert sacct(ids["eval"])["start"] in ("None", "Unknown") or sacct(ids["eval"])["start"] == sacct(ids["eval"])["end"]
    row = status_json(tmp_path)[0]
    assert row["state"] == "CANCELLED"
    assert [s["state"] for s in row["stages"]] == ["COMPLETED", "CANCELLED", "CANCELLED"]
    # Cancelled jobs linger in squeue (COMPLETING) until slurmd has reaped their processes.
    wait_for(lambda: not any(q.split()[0] in (ids["pretrain"], ids["eval"]) for q in my_queue()), 60,
             "the cancelled jobs to leave the queue")


def test_failed_stage_cancels_its_dependents(tmp_path: Path, smoke_overrides: list[str]) -> None:
    # No dataset at the URL and generation switched off: the data job fails on the node.
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *SLURM, *smoke_overrides,
                  "--set", "data.synthetic=null", "--set", f"data.train={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage data failed; cancelled: pretrain, eval" in res.stderr
    assert "no .tar shards at" in res.stderr  # the job's own message, from its log
    ids = job_ids(status_json(tmp_path)[0])
    assert sacct(ids["data"])["state"] == "FAILED"
    for stage in ("pretrain", "eval"):
        acct = wait_for(lambda: (a := sacct(ids[stage]))["state"] == "CANCELLED" and a, 60, f"{stage} cancelled")
        assert acct["start"] in ("None", "Unknown") or acct["start"] == acct["end"], acct  # it never ran
    assert list((tmp_path / "runs").glob("stages/*/model.pt")) == []


def test_requeued_pretraining_resumes_from_its_checkpoint(tmp_path: Path, smoke_overrides: list[str]) -> None:
    steps = 30
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *SLURM, *smoke_overrides,
                  "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=5", "--detach", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    row = status_json(tmp_path)[0]
    ids = job_ids(row)
    workdir = next((tmp_path / "runs").glob("stages/pretrain-*"))
    latest = workdir / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and int(latest.read_text().strip().removeprefix("step")) >= 10, 240,
             "a checkpoint at step 10 or later")
    subprocess.run(["scontrol", "requeue", ids["pretrain"]], check=True)
    saved_before_restart = int(latest.read_text().strip().removeprefix("step"))

    def eval_done():
        state = sacct(ids["eval"])["state"]
        assert state not in ("FAILED", "CANCELLED"), state
        return state == "COMPLETED"

    wait_for(eval_done, 420, "eval after the requeued pretraining", every=3)
    acct = sacct(ids["pretrain"])
    assert acct["state"] == "COMPLETED" and int(acct["restarts"]) >= 1, acct
    log = (Path(row["stages"][1]["folder"]) / "slurm" / f"{ids['pretrain']}_0_log.out").read_text()
    resumed = [ln for ln in log.splitlines() if ln.startswith("resumed from")]
    assert resumed, log[-3000:]
    resumed_step = int(resumed[-1].rsplit("step", 1)[1])
    assert resumed_step >= saved_before_restart >= 10
    summary = json.loads((workdir / "result.json").read_text())["metrics"]
    assert summary["steps_run"] == steps - resumed_step  # it did not start over
    assert (workdir / "model.pt").exists()
    final = status_json(tmp_path)[0]  # status reconciles MLflow with sacct for the detached run
    assert final["state"] == "COMPLETED", final


@pytest.mark.parametrize("setting, message", [
    ("cluster.slurm.gpus_per_node=1", "Invalid generic resource"),
    ("cluster.slurm.nodes=4", "Node count specification invalid"),
    ("cluster.slurm.mem_gb=100000", "Requested node configuration is not available"),
])
def test_impossible_request_fails_at_submit_leaving_nothing(tmp_path: Path, smoke_overrides: list[str],
                                                            setting: str, message: str) -> None:
    before = my_queue()
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *SLURM, *smoke_overrides, "--set", setting, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Slurm refused" in res.stderr and message in res.stderr and "Traceback" not in res.stderr
    assert my_queue() == before
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_dry_run_prints_sbatch_scripts_and_submits_nothing(tmp_path: Path) -> None:
    before = my_queue()
    res = run_cli("run", str(ROOT / "recipes/filip_large.yaml"), "--cluster", "example-site", "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("#!/bin/bash") == 3
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
    assert "afterok:<data job id>" in out and "afterok:<pretrain job id>" in out
    assert "train.workers 192 -> 32" in out
    assert my_queue() == before and not (tmp_path / "mlflow.db").exists()


def test_off_a_login_node_dry_run_still_plans_and_run_says_why_not(tmp_path: Path) -> None:
    # PATH without the Slurm client tools: a laptop, or a node without Slurm installed.
    env = {"PATH": str(Path(sys.executable).parent)}
    res = run_cli("run", str(ROOT / "recipes/filip_large.yaml"), "--cluster", "example-site", "--dry-run",
                  cwd=tmp_path, env=env)
    assert res.returncode == 0 and res.stdout.count("#!/bin/bash") == 3, res.stderr
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "slurm", cwd=tmp_path, env=env)
    assert res.returncode == 1 and "not a Slurm login node" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []
