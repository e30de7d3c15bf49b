"""Clusters that give a pretraining job another number of workers than last time (issue 22): a Slurm node range
(cluster.slurm.nodes "MIN-MAX") and a Ray Train elastic worker group (cluster.ray.workers "MIN-MAX").

Fast: the schema's ranges and refusals, the sbatch script submitit writes for a range, the ScalingConfig built with a
tuple, the pre-flight placement of MIN workers, the --dry-run placement text, the torch variables a Slurm task takes
from its job step. Slow, on the two-node test clusters (scripts/slurm-up.sh, scripts/ray-up.sh): a range job starts
on the nodes that are free; a 2-node pretraining loses filip-n2 mid-run and finishes on 1 worker from its last
checkpoint, once requeued by Slurm (nodes 1-2) and once restarted by Ray Train (workers 1-2, one per node).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from filipctl.backends.base import JobRequest
from filipctl.backends.ray import missing_resources, placement_note
from filipctl.backends.ray_placement import placeable
from filipctl.backends.slurm import SlurmBackend
from filipctl.contract import RunDir
from filipctl.orchestration.stages import Stage
from filipctl.reports.placement import describe_placement
from filipctl.schema import RayProfile, Recipe, SlurmProfile
from jobs.train.distributed import first_host, slurm_env, tasks_per_node
from tests.conftest import FILIPCTL, ROOT, longer_overrides, run_cli

PRETRAIN = Stage("pretrain", "jobs.train.pretrain", processes=2, distributed=True)
N1 = {"CPU": 2.0, "memory": 2.4e10, "node:10.77.0.11": 1.0, "node:__internal_head__": 1.0}
N2 = {"CPU": 2.0, "memory": 2.4e10, "node:10.77.0.12": 1.0}
LOST = "filip-n2"


# -- the schema ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, stored, bounds", [
    (2, 2, (2, 2)), ("2", 2, (2, 2)), ("2-2", 2, (2, 2)),  # a count, however written
    ("1-2", "1-2", (1, 2)), (" 1 - 4 ", "1-4", (1, 4)),
])
def test_a_count_or_a_range_of_nodes_and_workers(value: object, stored: object, bounds: tuple[int, int]) -> None:
    slurm = SlurmProfile(nodes=value, tasks_per_node=2)
    assert (slurm.nodes, slurm.node_range, slurm.elastic) == (stored, bounds, bounds[0] != bounds[1])
    assert slurm.world_sizes == tuple(2 * n for n in range(bounds[0], bounds[1] + 1))
    assert slurm.world_size == 2 * bounds[1]  # the most workers a job gets
    ray = RayProfile(workers=value)
    assert (ray.workers, ray.worker_range, ray.world_size) == (stored, bounds, bounds[1])
    assert ray.num_workers == (bounds if bounds[0] != bounds[1] else bounds[0])
    assert ray.world_sizes == tuple(range(bounds[0], bounds[1] + 1))


@pytest.mark.parametrize("value", [0, -1, "0-2", "3-1", "1-", "-2", "1-2-3", "a-b", "two", 1.5, True, None, [1, 2]])
def test_a_range_out_of_order_or_not_a_count_is_refused(value: object) -> None:
    for make in (lambda: SlurmProfile(nodes=value), lambda: RayProfile(workers=value)):
        with pytest.raises(ValidationError) as info:
            make()
        (error,) = info.value.errors()
        assert error["msg"] == ("Value error, expected a count (2) or a range MIN-MAX (1-4) with 1 <= MIN <= MAX, "
                                f"got {value!r}"), error


def test_the_cli_says_what_is_wrong_with_a_range_in_one_line(tmp_path: Path) -> None:
    res = run_cli("recipe", "validate", str(ROOT / "recipes/smoke.yaml"), "--set", "cluster.slurm.nodes=3-1",
                  cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert ("cluster.slurm.nodes: Value error, expected a count (2) or a range MIN-MAX (1-4) with 1 <= MIN <= MAX, "
            "got '3-1' (from --set cluster.slurm.nodes=3-1)") in res.stderr, res.stderr


@pytest.mark.parametrize("strategy", ["STRICT_PACK", "STRICT_SPREAD"])
def test_an_elastic_ray_group_needs_a_strategy_ray_train_sizes_it_for(strategy: str) -> None:
    """Ray Train 2.60 counts an elastic group's workers per node whatever the strategy; a STRICT_* group of that size
    may fit nowhere and would be retried forever."""
    with pytest.raises(ValidationError, match=f"workers 1-2 \\(a range\\) needs placement_strategy PACK or SPREAD, "
                                              f"not {strategy}"):
        RayProfile(workers="1-2", placement_strategy=strategy)
    assert RayProfile(workers=2, placement_strategy=strategy).num_workers == 2  # a count: as before
    assert RayProfile(workers="2-2", placement_strategy=strategy).num_workers == 2


def test_the_example_profiles_load() -> None:
    import yaml

    slurm = yaml.safe_load((ROOT / "clusters/slurm-range.yaml").read_text())
    ray = yaml.safe_load((ROOT / "clusters/ray-elastic.yaml").read_text())
    assert SlurmProfile(**slurm["slurm"]).node_range == (1, 2)
    assert RayProfile(**ray["ray"]).num_workers == (1, 2)


# -- Slurm: the job script ----------------------------------------------------------------------------------------

def sbatch_script(tmp_path: Path, **profile: object) -> tuple[list[str], str, SlurmBackend]:
    backend = SlurmBackend(SlurmProfile(partition="debug", **profile))
    text = backend.describe(JobRequest(PRETRAIN, RunDir(tmp_path / "pretrain")))
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    (srun,) = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    return sbatch, srun, backend


def test_a_node_range_asks_sbatch_for_the_range_and_srun_for_the_tasks_of_every_node(tmp_path: Path) -> None:
    """sbatch would turn --ntasks-per-node into --ntasks=MIN x tasks (Slurm 22.05), which Slurm then satisfies with MIN
    nodes however many are free: the allocation asks for nodes (and each node's CPUs), srun for the tasks."""
    sbatch, srun, backend = sbatch_script(tmp_path, nodes="1-2", tasks_per_node=2, cpus_per_task=3, gpus_per_node=1)
    assert "#SBATCH --nodes=1-2" in sbatch and "#SBATCH --mincpus=6" in sbatch, sbatch
    assert "#SBATCH --cpus-per-task=3" in sbatch and "#SBATCH --gpus-per-node=1" in sbatch, sbatch
    assert not any("ntasks" in ln for ln in sbatch), sbatch
    assert srun.startswith("srun --unbuffered") and "--ntasks-per-node=2 --cpus-per-task=3 " in srun, srun
    # submitit counts the job's tasks from its own `nodes` (MIN here): never more tasks than the job may run with.
    ex = backend._executor(JobRequest(PRETRAIN, RunDir(tmp_path / "pretrain")), planning=True)
    assert ex._num_tasks() <= min(backend.profile.world_sizes)

    sbatch, srun, _ = sbatch_script(tmp_path, nodes="1-2")  # one task per node, no CPUs asked: nothing else
    assert [ln for ln in sbatch if "nodes" in ln or "cpus" in ln or "ntasks" in ln] == ["#SBATCH --nodes=1-2"]
    assert " --ntasks-per-node=1 " in srun and "cpus-per-task" not in srun, srun


def test_a_node_count_writes_the_script_it_always_did(tmp_path: Path) -> None:
    sbatch, srun, _ = sbatch_script(tmp_path, nodes=2, tasks_per_node=1)
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch, sbatch
    assert not any("mincpus" in ln for ln in sbatch) and "ntasks-per-node" not in srun
    sbatch, _, _ = sbatch_script(tmp_path, nodes="2-2", tasks_per_node=1)  # "2-2" is the count 2
    assert "#SBATCH --nodes=2" in sbatch


def test_each_task_takes_rank_and_world_from_its_job_step() -> None:
    step = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_NODELIST": "filip-n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_NODES": "2",
            # the batch step's own view, which the step's overrides (a range job: sbatch never knew the count)
            "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "filip-n[1-2]"}
    assert slurm_env(step) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                               "MASTER_ADDR": "filip-n1"}
    requeued = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "2",
                "SLURM_JOB_NODELIST": "filip-n1", "SLURM_TASKS_PER_NODE": "2"}  # no step variables: the job's
    assert slurm_env(requeued) == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                                   "MASTER_ADDR": "filip-n1"}
    from filipctl.contract import JobError

    with pytest.raises(JobError, match="not inside a Slurm job step"):
        slurm_env({"SLURM_JOB_ID": "7"})


@pytest.mark.parametrize("nodelist, first", [("filip-n[1-2]", "filip-n1"), ("filip-n2", "filip-n2"),
                                             ("gpu[007-009,012]-ib,cpu1", "gpu007-ib"), ("a,b", "a"),
                                             ("rack[1-2]-n[3-4]", "rack1-n3"), ("node[5]", "node5")])
def test_the_first_host_of_a_node_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_tasks_per_node_expands_slurms_counts() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("4") == [4] and tasks_per_node("") == []


# -- Ray: ScalingConfig and the pre-flight placement ---------------------------------------------------------------

def test_a_worker_range_is_an_elastic_scaling_config() -> None:
    from ray.train import ScalingConfig

    from filipctl.backends.ray_driver import scaling_config

    elastic = scaling_config(RayProfile(workers="1-2", resources_per_worker={"CPU": 2}, resize_interval_s=15))
    assert isinstance(elastic, ScalingConfig) and elastic.elasticity_enabled  # Ray Train V2's, with a tuple
    assert (elastic.num_workers, elastic.min_workers, elastic.max_workers) == ((1, 2), 1, 2)
    assert elastic.elastic_resize_monitor_interval_s == 15 and elastic.resources_per_worker == {"CPU": 2}
    fixed = scaling_config(RayProfile(workers=2, placement_strategy="STRICT_SPREAD"))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled and fixed.placement_strategy == "STRICT_SPREAD"


@pytest.mark.parametrize("profile, nodes, expected", [
    # Room for the least is enough: one node of the two holds the one worker an elastic group needs.
    ({"workers": "1-2", "resources_per_worker": {"CPU": 2}}, [N1, N2], None),
    ({"workers": "1-2", "resources_per_worker": {"CPU": 2}}, [N1], None),
    ({"workers": "1-8", "resources_per_worker": {"CPU": 1}}, [N1, N2], None),
    # Not even the least: said with how many the nodes hold.
    ({"workers": "3-4", "resources_per_worker": {"CPU": 2}}, [N1, N2],
     "3-4 workers x {'CPU': 2.0} (at least 3) do not fit the Ray cluster (CPU: needs 6, has 4; the nodes hold 2)"),
    ({"workers": "2-4", "resources_per_worker": {"CPU": 1.5}}, [N1, N2], None),  # one per node: the least fits
    ({"workers": "3-4", "resources_per_worker": {"CPU": 1.5}}, [N1, N2, {"CPU": 1.0, "node:10.77.0.13": 1.0}],
     "3-4 workers x {'CPU': 1.5} (at least 3) cannot be placed on the Ray cluster's 3 nodes with placement_strategy "
     "PACK: the nodes hold 2 of them at most (nodes: 10.77.0.11 CPU 2, 10.77.0.12 CPU 2, 10.77.0.13 CPU 1)"),
])
def test_the_preflight_places_the_least_of_a_range(profile: dict, nodes: list, expected: str | None) -> None:
    assert missing_resources(RayProfile(**profile), nodes) == expected


def test_the_driver_says_how_many_of_a_range_the_nodes_hold() -> None:
    profile = RayProfile(workers="1-2", resources_per_worker={"CPU": 2})
    assert placement_note(profile, [N1, N2]) == "workers 1-2: the Ray cluster's 2 nodes hold 2"
    assert placement_note(profile, [N1]) == ("workers 1-2: the Ray cluster's 1 node holds 1 (more join when the nodes "
                                             "hold them: checked every 60 s)")
    assert placement_note(RayProfile(workers=2), [N1, N2]) == ""


@pytest.mark.parametrize("bundle, strategy, held", [
    ({"CPU": 1}, "PACK", 4), ({"CPU": 1}, "SPREAD", 4), ({"CPU": 1}, "STRICT_PACK", 2),
    ({"CPU": 1}, "STRICT_SPREAD", 2), ({"CPU": 3}, "PACK", 0), ({"CPU": 2}, "PACK", 2),
])
def test_placeable_counts_what_one_group_can_hold(bundle: dict, strategy: str, held: int) -> None:
    assert placeable(bundle, 8, [N1, N2], strategy) == held
    assert placeable(bundle, 1, [N1, N2], strategy) == min(1, held)


# -- the plan -----------------------------------------------------------------------------------------------------

def test_the_plan_says_a_range_runs_on_what_is_free() -> None:
    slurm = Recipe.model_validate({"name": "r", "cluster": {"backend": "slurm", "slurm": {"nodes": "1-2"}}})
    text = describe_placement(slurm, PRETRAIN)
    assert text.startswith("Slurm: 1-2 node(s) x 1 task(s) of ") and ("chosen by Slurm, as many as are free when the "
                                                                      "job starts (again after a requeue): 1 to 2 "
                                                                      "workers; rendezvous") in text, text
    ray = Recipe.model_validate({"name": "r", "cluster": {"backend": "ray", "ray": {
        "workers": "1-2", "resources_per_worker": {"CPU": 2}, "address": "10.77.0.11:6379"}}})
    text = describe_placement(ray, PRETRAIN)
    assert text.startswith("Ray Train: 1-2 workers x {'CPU': 2.0} in one placement group (PACK) (elastic: as many as "
                           "the nodes hold at each start and restart, grown when more fit, checked every 60 s) on the "
                           "Ray cluster at 10.77.0.11:6379"), text


# -- the Ray driver's record of its worker groups ------------------------------------------------------------------

def test_each_worker_group_of_a_ray_run_knows_the_size_and_start_of_the_one_before(tmp_path: Path) -> None:
    from filipctl.backends.ray_driver import attempt_of, last_failure

    attempts = tmp_path / "ray-attempts"
    attempts.write_text("")
    first = attempt_of(attempts, 2)
    second = attempt_of(attempts, 1)
    third = attempt_of(attempts, 2)
    assert (first.index, first.previous) == (0, None)
    assert (second.index, second.previous.world, third.previous.world, third.previous.previous.index) == (1, 2, 1, 0)
    # The failure of an attempt is the error recorded after it started, never an older one.
    run_dir = RunDir(tmp_path / "stage")
    run_dir.errors.mkdir(parents=True)
    (run_dir.errors / "rank1.json").write_text(json.dumps({"time": second.started - 100, "message": "old",
                                                           "rank": 1, "host": "filip-n2"}))
    assert last_failure(run_dir, since=second.started) is None
    assert "old" in (last_failure(run_dir) or "")


# -- on the Slurm test cluster: a range job starts on the nodes that are free --------------------------------------

RANKS_JOB = '''
import json, os, socket
from pathlib import Path


def main(argv):
    workdir = Path(argv[argv.index("--workdir") + 1])
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    record = {k: os.environ[k] for k in keys} | {"host": socket.gethostname()}
    (workdir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    return 0
'''


def slurm_up() -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh")], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_range_job_runs_its_tasks_on_every_node_it_got(tmp_path: Path) -> None:
    """nodes 1-2 x 2 tasks: both nodes idle -> 4 ranks on 2 nodes; filip-n2 taken by another job -> the job does not
    wait for it: 2 ranks on filip-n1, the world of each rank what srun started, and the backend sees it complete."""
    from filipctl.states import State
    from tests.slurm_util import hostnames, sacct, wait_for

    assert slurm_up().returncode == 0
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "ranksjob.py").write_text(RANKS_JOB)
    profile = SlurmProfile(nodes="1-2", tasks_per_node=2, cpus_per_task=1, time_min=5, partition="debug",
                           setup=[f"export PYTHONPATH={tmp_path / 'mods'}${{PYTHONPATH:+:$PYTHONPATH}}"])
    backend = SlurmBackend(profile, poll_interval_s=(0.25, 2.0))
    seen = {}
    hold = None
    try:
        for case in ("both_free", "n2_taken"):
            if case == "n2_taken":  # another job holds filip-n2 whole
                hold = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-w", LOST, "--exclusive", "-o",
                                       "/dev/null", "--wrap", "sleep 120"], capture_output=True, text=True,
                                      check=True).stdout.strip()
                wait_for(lambda: sacct(hold)["state"] == "RUNNING", 60, f"job {hold} running on {LOST}")
            run_dir = RunDir(tmp_path / case)
            run_dir.root.mkdir()
            handle = backend.submit(JobRequest(Stage(case, "ranksjob", processes=4, distributed=True), run_dir))
            t0 = time.time()
            while not (state := backend.poll([handle])[handle.ref]).ended and time.time() - t0 < 120:
                time.sleep(0.25)
            assert state is State.COMPLETED, backend.logs(handle)[-3000:]
            ranks = [json.loads(p.read_text()) for p in sorted(run_dir.root.glob("rank*.json"))]
            seen[case] = {"nodes": hostnames(sacct(handle.label)["nodes"]), "ranks": ranks,
                          "seconds": time.time() - t0}
    finally:
        if hold:
            subprocess.run(["scancel", hold], capture_output=True)
    both, alone = seen["both_free"], seen["n2_taken"]
    assert both["nodes"] == ["filip-n1", LOST]
    assert [(r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["LOCAL_WORLD_SIZE"], r["host"]) for r in both["ranks"]] == [
        ("0", "4", "0", "2", "filip-n1"), ("1", "4", "1", "2", "filip-n1"),
        ("2", "4", "0", "2", LOST), ("3", "4", "1", "2", LOST)]
    assert alone["nodes"] == ["filip-n1"]
    assert [(r["RANK"], r["WORLD_SIZE"], r["host"]) for r in alone["ranks"]] == [("0", "2", "filip-n1"),
                                                                                ("1", "2", "filip-n1")]
    assert {r["MASTER_ADDR"] for r in both["ranks"] + alone["ranks"]} == {"filip-n1"}
    print(f"nodes 1-2 x 2 tasks: {len(both['ranks'])} ranks on {both['nodes']} in {both['seconds']:.1f} s; with "
          f"{LOST} taken, {len(alone['ranks'])} ranks on {alone['nodes']} in {alone['seconds']:.1f} s")


# -- scenarios: a node lost in the middle of a 2-worker pretraining, finished on 1 worker ----------------------------

CHECKPOINT_EVERY = 10  # longer_overrides' train.checkpoint_every (40 steps)


def read_events(stage: Path) -> list[dict]:
    path = stage / "logs" / "pretrain.events.jsonl"
    out = []
    for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def latest_checkpoint(stage: Path) -> int:
    try:
        return int((stage / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        return 0


def rank_steps(stage: Path) -> dict[int, int]:
    from jobs.train.heartbeat import read_beats

    return {r: b.step for r, b in read_beats(stage / "logs" / "heartbeat").items()}


def pretrain_run(folder: Path) -> dict:
    """The pretrain stage's MLflow run: status, params, tags, metrics, the loss curve."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("filip").experiment_id],
                                "tags.`filipctl.stage` = 'pretrain'")
    history = client.get_metric_history(run.info.run_id, "loss")
    return {"status": run.info.status, "params": run.data.params, "tags": run.data.tags,
            "metrics": run.data.metrics, "losses": {m.step: m.value for m in history}, "loss_records": len(history)}


def segments_of(params: dict[str, str]) -> list[tuple[int, int]]:
    """(world size, start step) of each segment.K the stage's run holds, in K order."""
    ks = sorted({int(m.group(1)) for key in params if (m := re.fullmatch(r"segment\.(\d+)\.world_size", key))})
    return [(int(params[f"segment.{k}.world_size"]), int(params[f"segment.{k}.start_step"])) for k in ks]


def check_finished_on_one_worker(s: dict) -> int:
    """What both scenarios must show -> the step the run continued from on one worker."""
    assert s["code"] == 0, s["stdout"][-3000:] + s["stderr"][-5000:]
    stage = s["stage"]
    result = json.loads((stage / "result.json").read_text())["metrics"]
    assert (stage / "model.pt").exists()
    resumed = [e for e in s["events"] if e["message"].startswith("resumed from")]
    assert len(resumed) == 1, [e["message"] for e in s["events"]]
    step = int(re.findall(r"step(\d+)", resumed[0]["message"])[-1])
    # The checkpoint the two workers saved, continued by one: re-partitioned, with the data position.
    assert "(saved by 2 workers, re-partitioned for 1)" in resumed[0]["message"], resumed[0]
    assert "data restarts" not in resumed[0]["message"]
    assert CHECKPOINT_EVERY <= step == s["saved"] and 0 <= s["reached"] - step <= CHECKPOINT_EVERY, (step, s)
    # The log says the world size changed, and from which step.
    changed = [e for e in s["events"] if e["message"].startswith("world size ")]
    assert len(changed) == 1 and changed[0]["message"].startswith(f"world size 2 -> 1 from step {step}"), changed
    assert result["steps_run"] == 40 - step
    run = s["tracked"]
    assert run["status"] == "FINISHED"
    assert segments_of(run["params"]) == [(2, 0), (1, step)], run["params"]
    assert math.isfinite(run["metrics"]["final_loss"]) and math.isfinite(result["final_loss"])
    assert sorted(run["losses"]) == [5 * i for i in range(1, 9)] and run["loss_records"] == 8  # each step once
    assert run["tags"]["filipctl.restarts"] == "1" and run["tags"]["filipctl.restart.1"].startswith(f"from step {step}")
    return step


# Slurm: nodes 1-2, filip-n2 lost; Slurm requeues the job, which starts again on filip-n1 alone.

@pytest.fixture(scope="session")  # session: a test worker may run other modules' tests between these
def slurm_shrunk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.slurm_util import node_kill_lock

    up = slurm_up()
    assert up.returncode == 0, f"the Slurm test cluster did not come up:\n{up.stderr}"
    with node_kill_lock() as waited:  # from the job's start: a kill by another test would take its rank on filip-n2
        return {**slurm_scenario(tmp_path_factory.mktemp("slurm_range")), "lock_wait_s": waited}


def slurm_scenario(folder: Path) -> dict:
    """Pretrain on nodes 1-2 (both free: 2 workers), lose filip-n2 once the step-10 checkpoint is in and both ranks
    are past step 15, wait until Slurm requeued the job and started it again on filip-n1 alone, then bring the node
    back (the running job keeps its one node) and follow the run to its end."""
    from tests.slurm_util import incarnations, lose_node, wait_for

    argv = [*FILIPCTL, "run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "slurm-range", *longer_overrides(folder),
            "--set", "eval.enabled=false"]
    out, err = folder / "cli.out", folder / "cli.err"
    t0 = time.time()
    with out.open("w") as stdout, err.open("w") as stderr:
        cli = subprocess.Popen(argv, cwd=folder, stdout=stdout, stderr=stderr, env={**os.environ, "COLUMNS": "200"})
    job = None
    try:
        stage = wait_for(lambda: next(folder.glob("runs/stages/pretrain-*"), None), 300, "the pretrain stage folder")

        def past_the_checkpoint() -> bool:
            assert cli.poll() is None, f"filipctl run ended before the node was lost:\n{err.read_text()}"
            steps = rank_steps(stage)
            assert not (latest_checkpoint(stage) and len(steps) < 2), f"the job started on one node only: {steps}"
            return latest_checkpoint(stage) >= 10 and len(steps) == 2 and min(steps.values()) >= 15

        wait_for(past_the_checkpoint, 600, "a checkpoint and both ranks past step 15", every=0.1)
        job = next(stage.glob("slurm/*_submission.sh")).name.split("_")[0]
        saved, reached = latest_checkpoint(stage), max(rank_steps(stage).values())
        t_kill = time.time()
        killed = lose_node(LOST)

        def started_again() -> dict | None:
            lives = incarnations(job)
            assert lives and lives[0]["state"] in ("RUNNING", "NODE_FAIL"), lives
            return lives[-1] if len(lives) > 1 and lives[-1]["state"] == "RUNNING" else None

        again = wait_for(started_again, 240, f"Slurm to requeue job {job} and start it again", every=0.5)
        t_again = time.time()
        back = slurm_up()  # the node returns; the job keeps the one node it started with
        assert back.returncode == 0, back.stderr
        cli.wait(timeout=900)
    finally:
        if cli.poll() is None:  # the test failed: leave no job behind either
            cli.kill()
            if job:
                subprocess.run(["scancel", job], capture_output=True)
        slurm_up()  # never leave a node lost for the tests that follow
    return {"folder": folder, "stage": stage, "job": job, "code": cli.returncode, "stdout": out.read_text(),
            "stderr": err.read_text(), "saved": saved, "reached": reached, "killed": killed, "again": again,
            "t_kill": t_kill, "t_again": t_again, "elapsed_s": time.time() - t0, "events": read_events(stage),
            "tracked": pretrain_run(folder), "log": next(stage.glob(f"slurm/{job}_0_log.out")).read_text()}


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_a_requeued_range_job_finishes_on_the_node_left(slurm_shrunk: dict) -> None:
    from tests.slurm_util import hostnames, incarnations

    s = slurm_shrunk
    step = check_finished_on_one_worker(s)
    lives = incarnations(s["job"])
    assert [life["state"] for life in lives] == ["NODE_FAIL", "COMPLETED"], lives
    assert [hostnames(life["nodes"]) for life in lives] == [["filip-n1", LOST], ["filip-n1"]], lives
    assert f"world size 2 -> 1 from step {step}" in s["log"]  # the job's own log, as the events
    cause = s["tracked"]["tags"]["filipctl.restart.1"]
    assert f"the run before ended NODE_FAIL: {LOST} down" in cause, cause
    assert s["tracked"]["tags"]["filipctl.hosts"] == "filip-n1" and s["tracked"]["tags"]["filipctl.world_size"] == "1"
    print(f"Slurm nodes 1-2: lost {LOST} at step {s['reached']} (checkpoint step{s['saved']}); the job started again "
          f"on filip-n1 {s['t_again'] - s['t_kill']:.0f} s after the kill and continued from step {step} on 1 worker; "
          f"final loss {s['tracked']['metrics']['final_loss']:.4f}; run {s['elapsed_s']:.0f} s; "
          f"{s['lock_wait_s']:.0f} s waited for the lost-node lock")


# Ray: workers 1-2 of 2 CPUs (one per node), filip-n2's Ray lost; Ray Train restarts the group with 1 worker.

NODES = ROOT / "scripts" / "test-nodes.sh"
PYTHON = str(ROOT / ".venv" / "bin" / "python")


def ray_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "ray-up.sh"), *argv], capture_output=True, text=True,
                          timeout=300)


def ray_checkpoint_steps(storage: Path) -> list[int]:
    """The steps of the checkpoints Ray Train has registered in its storage (each holds DeepSpeed's `latest`)."""
    steps = []
    for latest in storage.glob("*/checkpoint_*/latest"):
        try:
            steps.append(int(latest.read_text().strip().removeprefix("step")))
        except (OSError, ValueError):
            continue
    return sorted(steps)


@pytest.fixture(scope="session")
def ray_shrunk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.slurm_util import node_kill_lock

    up = ray_script()
    assert up.returncode == 0, f"the two-node Ray cluster did not come up:\n{up.stderr}"
    with node_kill_lock() as waited:  # from the run's start until the node is back
        return {**ray_scenario(tmp_path_factory.mktemp("ray_elastic")), "lock_wait_s": waited}


def ray_scenario(folder: Path) -> dict:
    """Pretrain with workers 1-2 (one per node: 2 workers while both are up) driven from filip-n1; once the step-20
    checkpoint is in and rank 0 is past step 25, lose filip-n2 to Ray (scripts/ray-up.sh --kill) and keep it lost
    until the run ends, so that Ray Train does not grow the group back; then bring it back."""
    from tests.slurm_util import wait_for

    argv = [str(NODES), "--exec", "filip-n1", PYTHON, "-m", "filipctl.cli", "run", str(ROOT / "recipes/smoke.yaml"),
            "--cluster", "ray-elastic", *longer_overrides(folder),
            "--set", f"cluster.ray.storage_path={folder / 'ray'}", "--set", "eval.enabled=false"]
    out, err = folder / "cli.out", folder / "cli.err"
    t0 = time.time()
    with out.open("w") as stdout, err.open("w") as stderr:
        cli = subprocess.Popen(argv, cwd=folder, stdout=stdout, stderr=stderr, env={**os.environ, "COLUMNS": "200"})
    kill = {}
    try:
        stage = wait_for(lambda: next(folder.glob("runs/stages/pretrain-*"), None), 300, "the pretrain stage folder")

        def past_the_checkpoint() -> bool:
            assert cli.poll() is None, f"filipctl run ended before the node was lost:\n{err.read_text()[-5000:]}"
            done = [e["done"] for e in read_events(stage) if "done" in e]
            return bool(done) and max(done) >= 25

        wait_for(past_the_checkpoint, 600, "rank 0 past step 25", every=0.2)
        steps = rank_steps(stage)
        assert len(steps) == 2, f"the group did not start with 2 workers: {steps}"
        kill = {"t": time.time(), "beats": steps, "saved": ray_checkpoint_steps(folder / "ray")}
        killed = ray_script("--kill", LOST)
        assert killed.returncode == 0, killed.stderr
        cli.wait(timeout=900)
    finally:
        if cli.poll() is None:
            cli.kill()
        back = ray_script()  # the node back for the tests that follow
    events = read_events(stage)
    return {"folder": folder, "stage": stage, "code": cli.returncode, "stdout": out.read_text(),
            "stderr": err.read_text(), "events": events, "tracked": pretrain_run(folder), "kill": kill,
            "reached": max(kill["beats"].values()), "saved": max(kill["saved"], default=0),
            "back_rc": back.returncode,
            "elapsed_s": time.time() - t0, "log": (stage / "logs" / "pretrain.log").read_text(errors="replace")}


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_an_elastic_ray_group_restarts_on_the_node_left_and_finishes(ray_shrunk: dict) -> None:
    s = ray_shrunk
    step = check_finished_on_one_worker(s)
    assert s["back_rc"] == 0
    resumed = next(e for e in s["events"] if e["message"].startswith("resumed from"))
    assert resumed["message"].startswith("resumed from ray checkpoint"), resumed
    assert "workers 1-2: the Ray cluster's 2 nodes hold 2" in s["log"] + s["stdout"]  # the driver, at the start
    assert "restart 1 of 2 (Ray Train FailureConfig): resuming from step" in s["log"] + s["stdout"]
    assert s["tracked"]["tags"]["filipctl.hosts"] == "filip-n1" and s["tracked"]["tags"]["filipctl.world_size"] == "1"
    print(f"Ray workers 1-2: lost {LOST}'s Ray at step {s['reached']}; continued from step {step} on 1 worker "
          f"{resumed['t'] - s['kill']['t']:.0f} s after the kill; final loss "
          f"{s['tracked']['metrics']['final_loss']:.4f}; run {s['elapsed_s']:.0f} s; "
          f"{s['lock_wait_s']:.0f} s waited for the lost-node lock")
