"""A node lost in the middle of a two-node pretraining on the Slurm test cluster (scripts/slurm-up.sh), and the job
surviving it.

conftest.local_run's recipe (40 steps, a checkpoint every 10) pretrains as 2 nodes x 1 task (clusters/slurm.yaml)
under an attached `filipctl run`. Once the step-10 checkpoint is saved and both ranks passed step 15, filip-n2 is lost:
its slurmd and every process Slurm runs on it are SIGKILLed at once (slurm_util.lose_node). What Slurm 22.05 then does,
and what these tests check: slurmctld marks the node down once it missed SlurmdTimeout, ends the job's incarnation
NODE_FAIL and, the job being submitted with --requeue (JobRequeue=1), queues it again, where it waits for two nodes.
scripts/slurm-up.sh restarts the node's slurmd, the node registers and is back (ReturnToService=2), the job starts
again and resumes from its last checkpoint with its data position, so it ends as the uninterrupted local run ends.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from filipctl.backends.slurm import SlurmBackend
from filipctl.contract import port_from_job_id
from filipctl.states import State
from tests.conftest import FILIPCTL, ROOT, longer_overrides
from tests.slurm_util import (hostnames, incarnations, lose_node, node_kill_lock, sacct, slurm_cluster,  # noqa: F401
                              wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one worker runs every test of the one cluster

LOST = "filip-n2"
CHECKPOINT_EVERY = 10  # longer_overrides' train.checkpoint_every
KILL_AFTER = 15  # both ranks past this step (and the step-10 checkpoint saved): half an interval is then at stake


def latest_checkpoint(stage: Path) -> int:
    try:
        return int((stage / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        return 0


def rank_steps(stage: Path) -> list[int]:
    """The last step each rank completed, from its heartbeat (jobs/train/heartbeat.py)."""
    steps = []
    for beat in sorted((stage / "logs" / "heartbeat").glob("rank*")):
        try:
            steps.append(int(beat.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            steps.append(0)
    return steps


def events(stage: Path) -> list[dict]:
    lines = (stage / "logs" / "pretrain.events.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


class Said(logging.Handler):
    """What a logger said, kept."""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.logger = logging.getLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "Said":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def slurm_up() -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lost_node(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The scenario, once for the module: the attached run, the node lost mid-interval, brought back once Slurm
    requeued the job. -> what the tests check (figures, the job id, the stage folder, the CLI's output)."""
    with node_kill_lock() as waited:  # from the job's start: a kill by the Ray test would take its rank on filip-n2
        return {**scenario(tmp_path_factory.mktemp("slurm_lost_node")), "lock_wait_s": waited}


def scenario(folder: Path) -> dict:
    """Run the pretraining attached, lose the node once past the checkpoint, bring it back once the job is requeued."""
    argv = [*FILIPCTL, "run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "slurm", *longer_overrides(folder),
            "--set", "eval.enabled=false"]  # pretraining is what is at stake; eval's settings enter no other key
    out, err = folder / "cli.out", folder / "cli.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        cli = subprocess.Popen(argv, cwd=folder, stdout=stdout, stderr=stderr,
                               env={**os.environ, "COLUMNS": "200"})
    job = None
    try:
        stage = wait_for(lambda: next(folder.glob("runs/stages/pretrain-*"), None), 300, "the pretrain stage folder")

        def past_the_checkpoint() -> bool:
            assert cli.poll() is None, f"filipctl run ended before the node was lost:\n{err.read_text()}"
            steps = rank_steps(stage)
            return latest_checkpoint(stage) >= 10 and len(steps) == 2 and min(steps) >= KILL_AFTER

        wait_for(past_the_checkpoint, 400, f"a checkpoint and both ranks past step {KILL_AFTER}", every=0.1)
        job = next(stage.glob("slurm/*_submission.sh")).name.split("_")[0]
        saved, reached = latest_checkpoint(stage), max(rank_steps(stage))
        t_kill = time.time()
        killed = lose_node(LOST)

        def requeued() -> str | None:
            queue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True).stdout
            lives = incarnations(job)
            # A slurmd started on the node before Slurm saw it lost (another slurm-up.sh) reports the step missing:
            # srun then aborts the step and the job fails, which is not the scenario under test.
            assert lives and lives[0]["state"] in ("RUNNING", "NODE_FAIL"), (lives, queue)
            return queue.strip() if lives[0]["state"] == "NODE_FAIL" and queue.startswith("PENDING") else None

        queued_as = wait_for(requeued, 180, f"Slurm to requeue job {job} after losing {LOST}", every=0.5)
        t_requeued = time.time()
        # Until the job starts again, sacct reads NODE_FAIL of it: what the CLI's poll (every 0.5-10 s) may see or
        # miss, asked here at a moment it is so. The backend takes the job for queued, and says which node was lost.
        with Said("filipctl.backends.slurm") as said:
            backend = SlurmBackend()
            handle = backend.attach(f"{job}@{stage / 'slurm'}")
            read_as = (sacct(job)["state"], backend.poll([handle])[handle.ref])
        lost_state = subprocess.run(["sinfo", "-h", "-N", "-n", LOST, "-o", "%T"], capture_output=True,
                                    text=True).stdout.strip()
        time.sleep(3)  # the job waits for two nodes: it stays queued while the node is away
        still_queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                      text=True).stdout.strip()
        back = slurm_up()
        assert back.returncode == 0, back.stderr
        t_back = time.time()
        cli.wait(timeout=600)
    finally:
        if cli.poll() is None:  # the test failed: leave no job behind either
            cli.kill()
            if job:
                subprocess.run(["scancel", job], capture_output=True)
        slurm_up()  # never leave a node lost for the tests that follow
    resumed = next((e for e in events(stage) if e["message"].startswith("resumed from")), None)
    return {"folder": folder, "stage": stage, "job": job, "code": cli.returncode, "stdout": out.read_text(),
            "stderr": err.read_text(), "saved": saved, "reached": reached, "killed": killed,
            "queued_as": queued_as, "lost_state": lost_state, "still_queued": still_queued, "resumed": resumed,
            "read_as": read_as, "said": said.lines,
            "t_kill": t_kill, "t_requeued": t_requeued, "t_back": t_back,
            "log": next(stage.glob(f"slurm/{job}_0_log.out")).read_text()}


def test_slurm_requeues_the_job_of_a_lost_node_and_it_resumes_from_its_last_checkpoint(lost_node: dict) -> None:
    s = lost_node
    assert s["code"] == 0, s["stdout"][-3000:] + s["stderr"][-3000:]
    # Slurm ended the incarnation on the lost node NODE_FAIL and queued the job again; it waited for two nodes.
    lives = incarnations(s["job"])
    assert [life["state"] for life in lives] == ["NODE_FAIL", "COMPLETED"], lives
    assert all(hostnames(life["nodes"]) == ["filip-n1", LOST] for life in lives), lives
    assert s["lost_state"].startswith("down") and s["still_queued"] == "PENDING", s
    # The backend read sacct's NODE_FAIL of the requeued job as queued, naming the lost node; the CLI followed the
    # job through it (its exit status above).
    assert s["read_as"] == ("NODE_FAIL", State.QUEUED), s["read_as"]
    assert f"Slurm job {s['job']} lost node {LOST} (NODE_FAIL) and was requeued" in s["said"][0], s["said"]
    assert "stage pretrain failed" not in s["stderr"], s["stderr"]
    # The CLI that followed it told the user, naming the node (however its sacct calls fell around the NODE_FAIL).
    told = [ln for ln in s["stderr"].splitlines() if f"Slurm job {s['job']}" in ln and "requeued" in ln]
    assert len(told) == 1 and LOST in told[0], s["stderr"]
    # It resumed from the checkpoint saved before the loss: at most one checkpoint interval was trained again.
    assert s["resumed"] is not None, s["log"][-3000:]
    resumed_step = int(s["resumed"]["message"].rsplit("step", 1)[1].split(";")[0])
    assert s["resumed"]["message"].startswith(f"resumed from {s['stage']}/checkpoints/step{resumed_step}")
    assert "data restarts" not in s["resumed"]["message"]  # the checkpoint held the loaders' position
    assert resumed_step == s["saved"] >= 10
    lost_steps = s["reached"] - resumed_step
    assert 0 <= lost_steps <= CHECKPOINT_EVERY
    summary = json.loads((s["stage"] / "result.json").read_text())["metrics"]
    assert summary["steps_run"] == 40 - resumed_step
    assert (s["stage"] / "model.pt").exists()
    print(f"lost node {LOST} at step {s['reached']} (checkpoint step{s['saved']}); killed {len(s['killed'])} "
          f"processes; Slurm requeued the job {s['t_requeued'] - s['t_kill']:.1f} s after the kill "
          f"(squeue: {s['queued_as']}); node back {s['t_back'] - s['t_kill']:.1f} s after the kill; resumed from "
          f"step {resumed_step} {s['resumed']['t'] - s['t_kill']:.1f} s after the kill "
          f"({s['resumed']['t'] - s['t_back']:.1f} s after the node was back); steps lost {lost_steps}; "
          f"{s['lock_wait_s']:.0f} s waited for the lost-node lock")


def test_the_resumed_pretraining_ends_as_the_uninterrupted_run(lost_node: dict, local_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{lost_node['folder'] / 'mlflow.db'}")
    (pre,) = client.search_runs([client.get_experiment_by_name("filip").experiment_id],
                                "tags.`filipctl.stage` = 'pretrain'")
    local_pre = MlflowClient(local_run["uri"]).get_run(local_run["pretrain_run"])
    # Same world size and threads per rank as the 2 local processes: what bitwise equality needs besides the recipe.
    for tag in ("filipctl.world_size", "filipctl.torch_threads"):
        assert pre.data.tags[tag] == local_pre.data.tags[tag], tag
    history = client.get_metric_history(pre.info.run_id, "loss")
    curve = {m.step: m.value for m in history}
    assert len(history) == len(curve) == 8  # steps 5..40, each once: the retrained steps were not logged again
    assert curve == local_run["losses"]  # bit for bit, the steps before the loss and after the resume alike
    final, uninterrupted = pre.data.metrics["final_loss"], local_pre.data.metrics["final_loss"]
    assert final == uninterrupted
    print(f"final loss {final!r} after the lost node, {uninterrupted!r} uninterrupted (local run)")


def test_mlflow_shows_where_it_ran_and_the_requeue(lost_node: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{lost_node['folder'] / 'mlflow.db'}")
    (pre,) = client.search_runs([client.get_experiment_by_name("filip").experiment_id],
                                "tags.`filipctl.stage` = 'pretrain'")
    tags = pre.data.tags
    assert pre.info.status == "FINISHED"
    # Each rank on its own node, the rendezvous on the first node of the allocation at the job's own port.
    assert tags["filipctl.hosts"] == f"filip-n1,{LOST}"
    assert tags["filipctl.rendezvous"] == f"filip-n1:{port_from_job_id(lost_node['job'])}"
    # The requeue, at the step it resumed from.
    resumed_step = int(lost_node["resumed"]["message"].rsplit("step", 1)[1].split(";")[0])
    assert tags.get("filipctl.restarts") == "1", tags
    assert [(m.step, m.value) for m in client.get_metric_history(pre.info.run_id, "restarts")] == [(resumed_step, 1)]
    # Why, with the lost node by name, from Slurm's accounting (the requeued job asked it, not the CLI).
    cause = tags.get("filipctl.restart.1", "")
    assert cause.startswith(f"from step {resumed_step}: the run before ended NODE_FAIL: {LOST} down from"), tags
