"""Ray as a scheduler: `filipctl ablate --cluster ray-jobs` submits the whole stage graph as one Ray job to the
two-node test cluster's Jobs API (scripts/ray-up.sh: head on filip-n1, http://10.77.0.11:8265, worker on filip-n2,
2 CPUs each). The CLI runs here, in the root namespace, and only speaks HTTP to the head (Jobs API, state API); every
Ray process runs on the nodes.

One scenario (about 5 minutes) is shared by the tests: a detached ablation of aug and late_interaction (4 variants,
2 workers x 1 CPU each, so that two trainers fit the 4 CPUs at once), the same ablation on the local backend beside
it, the same command again without --detach (every stage cached: the CLI follows the Ray job to its table), then a
second detached ablation cancelled mid-training with `filipctl cancel`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, FILIPCTL, run_cli, tiny_in

JOBS = "http://10.77.0.11:8265"
ABLATION = str(ROOT / "recipes/ablation.yaml")
COMPONENTS = "aug,late_interaction"


def on_ray(folder: Path, **changes: object) -> list[str]:
    return ["--cluster", "ray-jobs", *tiny_in(folder, **{"cluster.ray.storage_path": folder / "ray-store", **changes})]


def status(folder: Path, cwd: Path) -> list[dict]:
    res = run_cli("status", "--json", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", cwd=cwd, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def job_status(job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(JOBS).get_job_status(job_id))


def wait_job(job_id: str, timeout_s: float = 900) -> str:
    t0 = time.time()
    while (state := job_status(job_id)) in ("PENDING", "RUNNING") and time.time() - t0 < timeout_s:
        time.sleep(2)
    return state


def leftovers(folder: Path) -> dict[str, list]:
    """What Ray still holds for the stage drivers of the runs under `folder`: placement groups not removed and train
    workers alive. The drivers' Ray job ids are in their stage logs (a driver inside the graph's Ray job is listed
    under that job's id, not its own); the rest is plain HTTP to the dashboard's state API."""
    from ray.util.state import list_actors, list_placement_groups

    drivers = {m.group(1) for log in (folder / "runs" / "stages").glob("*/logs/*.log")
               for m in re.finditer(r"ray driver of \w+: Ray job (\w+)", log.read_text(errors="replace"))}
    groups = [g for g in list_placement_groups(address=JOBS, raise_on_missing_output=False)
              if g.state in ("CREATED", "PENDING", "RESCHEDULING")]
    workers = list_actors(address=JOBS, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                          raise_on_missing_output=False)
    return {"drivers": sorted(drivers), "groups": [g.placement_group_id for g in groups if g.creator_job_id in drivers],
            "workers": [a.actor_id for a in workers if a.job_id in drivers],
            "groups_anyone": [(g.placement_group_id, g.state, g.creator_job_id) for g in groups]}


def wait_released(folder: Path, timeout_s: float = 90) -> dict[str, list]:
    t0 = time.time()
    while (left := leftovers(folder))["groups"] or left["workers"]:
        if time.time() - t0 > timeout_s:
            break
        time.sleep(1)
    return left


def records(folder: Path, stage: str) -> dict[str, dict]:
    """Each stage folder's job record (written on the head: which Ray job started it, when it started and ended)."""
    out = {}
    for path in sorted((folder / "runs" / "stages").glob(f"{stage}-*/logs/{stage}.job.json")):
        out[path.parent.parent.name] = json.loads(path.read_text())
    return out


@pytest.fixture(scope="session")
def ray_jobs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    up = subprocess.run(["bash", str(ROOT / "scripts/ray-up.sh")], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    base = tmp_path_factory.mktemp("ray_jobs")
    a, local, elsewhere = base / "ray", base / "local", base / "elsewhere"
    for folder in (a, local, elsewhere):
        folder.mkdir()
    out: dict = {"ray": a, "local": local}
    t0 = time.time()
    res = run_cli("ablate", ABLATION, "--components", COMPONENTS, "--detach", *on_ray(a), cwd=a, timeout=300)
    out["detach"] = {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr, "seconds": time.time() - t0}
    assert res.returncode == 0, res.stdout + res.stderr
    out["job_id"] = job_id = next(w for w in res.stdout.split() if w.startswith("filipctl-")).rstrip(".")
    out["job_at_return"] = job_status(job_id)
    out["status_running"] = status(a, elsewhere)  # a second process, another folder: the same store
    # The same ablation on the local backend, meanwhile (the table must be the same).
    local_run = subprocess.Popen([*FILIPCTL, "ablate", ABLATION, "--components", COMPONENTS, "--json", *tiny_in(local)],
                                 cwd=local, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out["job_end"] = wait_job(job_id)
    out["ray_seconds"] = time.time() - t0
    out["released"] = wait_released(a)
    out["status_done"] = status(a, elsewhere)
    out["records"] = records(a, "pretrain")
    out["events"] = {p.parent.parent.name: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
                     for p in (a / "runs" / "stages").glob("pretrain-*/logs/pretrain.events.jsonl")}
    (table,) = list((a / "runs" / "ablations").glob("*/ablation.json"))
    out["ray_table"] = json.loads(table.read_text())

    # The same command again without --detach: everything is cached; the CLI follows the Ray job to its table.
    res = run_cli("ablate", ABLATION, "--components", COMPONENTS, "--json", *on_ray(a), cwd=a, timeout=600)
    out["again"] = {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}

    # A second detached ablation, long enough to be cancelled mid-training (its data stage is the first's).
    res = run_cli("ablate", ABLATION, "--components", "aug", "--detach",
                  *on_ray(a, **{"train.steps": 3000, "train.checkpoint_every": 1000, "train.log_every": 1}),
                  cwd=a, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    second = next(w for w in res.stdout.split() if w.startswith("filipctl-")).rstrip(".")
    out["second"] = second
    t1 = time.time()
    while time.time() - t1 < 400 and job_status(second) in ("PENDING", "RUNNING"):  # until a training step is done
        events = [p for p in (a / "runs" / "stages").glob("pretrain-*/logs/pretrain.events.jsonl")
                  if p.parent.parent.name not in out["records"]]
        if any('"done"' in line for p in events for line in p.read_text().splitlines()):
            break
        time.sleep(1)
    out["before_cancel"] = leftovers(a)
    t2 = time.time()
    res = run_cli("cancel", "--tracking-uri", f"sqlite:///{a / 'mlflow.db'}", cwd=elsewhere, timeout=300)
    out["cancel"] = {"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr, "seconds": time.time() - t2}
    out["second_end"] = wait_job(second, 120)
    out["after_cancel"] = wait_released(a)
    out["status_cancelled"] = status(a, elsewhere)

    stdout, stderr = local_run.communicate(timeout=900)
    assert local_run.returncode == 0, stderr[-5000:]
    out["local_table"] = json.loads(stdout)
    out["elapsed_s"] = time.time() - t0
    print(f"ray-jobs scenario: {out['elapsed_s']:.0f} s (detach {out['detach']['seconds']:.1f} s, ablation on Ray "
          f"{out['ray_seconds']:.0f} s, cancel {out['cancel']['seconds']:.1f} s)")
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_detached_ablation_returns_at_once_and_status_from_elsewhere_shows_its_variants(ray_jobs: dict) -> None:
    d = ray_jobs["detach"]
    # It returns once Ray has the job (seconds: ~5 s on a quiet machine), not when the graph ends (minutes).
    assert d["seconds"] < 60 and ray_jobs["job_at_return"] in ("PENDING", "RUNNING"), (d, ray_jobs["job_at_return"])
    assert "detached" in d["stdout"] and f"Ray job {ray_jobs['job_id']}" in d["stdout"], d["stdout"]
    assert "filipctl status" in d["stdout"] and "filipctl cancel" in d["stdout"]
    (row,) = ray_jobs["status_running"]
    assert row["kind"] == "ablation" and row["backend"] == "ray" and row["state"] == "RUNNING", row
    assert [v["variant"] for v in row["variants"]] == ["baseline", "+aug", "+late_interaction", "+aug+late_interaction"]
    for v in row["variants"]:  # each stage is the Ray job's, and Ray (not a pid) says whether it lives
        assert [s["stage"] for s in v["stages"]] == ["data", "pretrain", "eval"]
        assert all(s["job"] == ray_jobs["job_id"] for s in v["stages"]), v
        assert all(s["scheduler"] in ("QUEUED", "RUNNING", "COMPLETED") for s in v["stages"] if s["scheduler"]), v
    assert ray_jobs["job_end"] == "SUCCEEDED"
    (done,) = ray_jobs["status_done"]
    assert done["state"] == "COMPLETED" and all(v["state"] == "COMPLETED" for v in done["variants"]), done


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_two_pretrainings_overlap_and_the_table_equals_the_local_backends(ray_jobs: dict) -> None:
    recs = ray_jobs["records"]
    assert len(recs) == 4 and all(r["ray_job"] == ray_jobs["job_id"] and r["exit_code"] == 0 for r in recs.values())
    spans = sorted((r["started"], r["ended"], name) for name, r in recs.items())
    overlaps = [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    steps = {name: [e["t"] for e in evs if e.get("message", "").lstrip().startswith("step")]
             for name, evs in ray_jobs["events"].items()}
    print(f"pretraining spans (s from the first start): "
          f"{[(n, round(s - spans[0][0], 1), round(e - spans[0][0], 1)) for s, e, n in spans]}; overlapping: {overlaps}; "
          f"training steps: {({n: (round(min(t) - spans[0][0], 1), round(max(t) - spans[0][0], 1)) for n, t in steps.items() if t})}")
    assert overlaps, spans  # two 2-worker trainers on the 4 CPUs at once
    # Their drivers overlapping is not enough (one could wait on Ray for its placement group): two trainings ran at
    # once, from the "pretraining ..." line (workers placed, engine built) to their last step.
    training = {}
    for name, evs in ray_jobs["events"].items():
        start = [e["t"] for e in evs if e.get("message", "").lstrip().startswith("pretraining")]
        if start and steps.get(name):
            training[name] = (min(start), max(steps[name]))
    windows = sorted((a, b, n) for n, (a, b) in training.items())
    assert any(b[0] < a[1] for i, a in enumerate(windows) for b in windows[i + 1:]), windows
    ray_table, local_table = ray_jobs["ray_table"], ray_jobs["local_table"]
    assert ray_table["rows"] == local_table["rows"]  # every figure, bit for bit: same seeds, same training
    assert ray_table["title"] == local_table["title"]
    assert [r["setting"] for r in ray_table["rows"]] == ["baseline", "+aug", "+late_interaction", "+aug+late_interaction"]


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_no_placement_group_or_train_worker_is_left_after_the_run(ray_jobs: dict) -> None:
    left = ray_jobs["released"]
    assert len(left["drivers"]) >= 9, left  # data, 4 pretrainings, 4 evals: one Ray driver each, on the head
    assert left["groups"] == [] and left["workers"] == [], left
    print(f"placement groups not removed after the run (anyone's): {left['groups_anyone']}")


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_the_same_command_without_detach_follows_the_ray_job_to_its_table(ray_jobs: dict) -> None:
    again = ray_jobs["again"]
    assert again["rc"] == 0, again["stderr"][-3000:]
    assert json.loads(again["stdout"])["rows"] == ray_jobs["ray_table"]["rows"]
    assert "submitted as Ray job" in again["stderr"] and "cached" in again["stderr"], again["stderr"][-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_cancel_mid_run_stops_every_trainer_and_releases_every_placement_group(ray_jobs: dict) -> None:
    before, c = ray_jobs["before_cancel"], ray_jobs["cancel"]
    assert before["workers"] and before["groups"], before  # cancelled while training
    assert c["rc"] == 0 and "cancelled" in c["stdout"] and ray_jobs["second"] in c["stdout"], c
    assert ray_jobs["second_end"] == "STOPPED"
    left = ray_jobs["after_cancel"]
    assert left["groups"] == [] and left["workers"] == [], left
    print(f"cancel took {c['seconds']:.1f} s; placement groups not removed afterwards (anyone's): {left['groups_anyone']}")
    (row, *_) = ray_jobs["status_cancelled"]
    assert row["state"] == "CANCELLED", row
    for v in row["variants"]:
        states = {s["stage"]: s["state"] for s in v["stages"]}
        # data: the first ablation's (CACHED), unless the worker code changed in between (then run again)
        assert states["data"] in ("CACHED", "COMPLETED") and states["pretrain"] == "CANCELLED", states


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
@pytest.mark.parametrize("address, message", [
    ("http://10.77.0.11:9", "nothing answers at 10.77.0.11:9"),
    ("http://10.77.0.11:6379", "not as a Ray dashboard"),  # the GCS port: gRPC, not the Jobs API
    ("http://:8265", "expected http://HOST:PORT"),
])
def test_a_bad_or_unreachable_jobs_address_is_refused_before_anything_is_written(
        tmp_path: Path, address: str, message: str) -> None:
    t0 = time.time()
    res = run_cli("ablate", ABLATION, "--components", "aug", "--detach", *on_ray(tmp_path),
                  "--set", f"cluster.ray.address={address}", cwd=tmp_path, timeout=120)
    assert time.time() - t0 < 30
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.xdist_group("ray2")
def test_a_cluster_too_small_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    up = subprocess.run(["bash", str(ROOT / "scripts/ray-up.sh")], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    res = run_cli("ablate", ABLATION, "--components", "aug", "--detach", *on_ray(tmp_path),
                  "--set", "cluster.ray.workers=8", cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "CPU: needs 8, has 4" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert list(tmp_path.iterdir()) == []


# -- without a cluster: how a stage's state is read, and the graph the runner gets --------------------------------

@pytest.mark.parametrize("record, job, result, expected", [
    (None, "RUNNING", False, "QUEUED"),  # not started yet: the runner on the head holds it
    ({"ray_job": "J"}, "RUNNING", False, "RUNNING"),
    ({"ray_job": "OLD", "exit_code": 0}, "RUNNING", True, "QUEUED"),  # an earlier attempt's record is not this job's
    ({"ray_job": "J", "exit_code": 0}, "STOPPED", True, "COMPLETED"),
    ({"ray_job": "J", "exit_code": 1}, "SUCCEEDED", False, "FAILED"),
    ({"ray_job": "J", "cancelled": True}, "STOPPED", False, "CANCELLED"),  # the runner was killed before recording it
    ({"ray_job": "J"}, "FAILED", True, "COMPLETED"),  # it finished; the runner died before it saw so
    ({"ray_job": "J"}, "FAILED", False, "FAILED"),
    (None, "STOPPED", False, "CANCELLED"),  # never started: cancelled with its job
    (None, "UNKNOWN", False, "FAILED"),  # the cluster forgot the job (restarted): nothing will run it
])
def test_a_stage_lives_as_its_ray_job_says_and_ended_as_its_record_says(
        tmp_path: Path, record: dict | None, job: str, result: bool, expected: str) -> None:
    from filipctl.backends.ray_jobs import StageRef, stage_state
    from filipctl.contract import RunDir

    folder = RunDir(tmp_path / "pretrain-abc")
    folder.logs.mkdir(parents=True)
    if record is not None:  # a pid that is not ours anywhere: liveness must not come from it
        folder.job_record("pretrain").write_text(json.dumps({"pid": 999999999, **record}))
    if result:
        folder.result.write_text("{}")
    ref = StageRef(JOBS, "J", folder.job_record("pretrain"))
    assert StageRef.parse(str(ref)) == ref
    assert stage_state(ref, job).value == expected


@pytest.mark.parametrize("job, expected", [("RUNNING", "RUNNING"), ("SUCCEEDED", "UNKNOWN"), ("FAILED", "UNKNOWN")])
def test_a_machine_that_does_not_see_the_run_folder_never_reads_a_stage_as_ended(tmp_path: Path, job: str,
                                                                                  expected: str) -> None:
    from filipctl.backends.ray_jobs import StageRef, stage_state

    ref = StageRef(JOBS, "J", tmp_path / "elsewhere" / "pretrain-abc" / "logs" / "pretrain.job.json")
    assert stage_state(ref, job).value == expected


def test_the_graph_the_runner_gets_is_the_graph_the_cli_planned(tmp_path: Path) -> None:
    from rich.console import Console

    from filipctl.orchestration.ablation import variants
    from filipctl.orchestration.graph_job import graph_from_dict, graph_to_dict
    from filipctl.orchestration.pipeline import GraphRun
    from filipctl.recipes import load_recipe

    r = load_recipe(ABLATION, [f"output_dir={tmp_path / 'runs'}"], cluster="ray-jobs")
    run = GraphRun(variants(r, ["aug", "late_interaction"], [0, 1]), Console(quiet=True))
    back = graph_from_dict(json.loads(json.dumps(graph_to_dict(run.graph))))
    assert back.variants == run.graph.variants and back.recipes == run.graph.recipes
    assert list(back.nodes) == list(run.graph.nodes)  # the same keys, in the same (topological) order
    for key, node in run.graph.nodes.items():
        other = back.nodes[key]
        assert (other.stage, other.deps, other.run_dir, other.variants, other.recipe) == \
               (node.stage, node.deps, node.run_dir, node.variants, node.recipe)
