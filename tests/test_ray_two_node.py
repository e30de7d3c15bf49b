"""The Ray backend on the real two-node test cluster (scripts/ray-up.sh: head on filip-n1, worker on filip-n2, 2 CPUs
each), the driver per stage on filip-n1: one worker per node, the placement refused before anything runs when no node
can hold it, and a node lost in the middle of pretraining. What ran: tests/ray_two_node_scenario.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# One worker runs the scenario once for every test here (and holds the machine-wide lost-node lock while it kills).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray2")]

ADDRESS = {"filip-n1": "10.77.0.11", "filip-n2": "10.77.0.12"}


# Session scope: a test worker may run other modules' tests between these, which would end a module fixture.
@pytest.fixture(scope="session")
def ray2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the scenario once (about 4 minutes: two 40-step pretrainings, one with filip-n2 lost) and share what it saw."""
    up = subprocess.run(["bash", str(ROOT / "scripts/ray-up.sh")], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, f"the two-node Ray cluster did not come up:\n{up.stderr}"
    work = tmp_path_factory.mktemp("ray2")
    result = work / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/ray_two_node_scenario.py"), str(work), str(result)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0 and result.exists(), proc.stderr[-5000:]
    return json.loads(result.read_text())


def curve(run: dict) -> dict[int, float]:
    return {int(step): loss for step, loss in run["tracked"]["losses"].items()}


def test_two_node_pretraining_rendezvous_at_rank_0_and_the_local_curve(ray2: dict, local_run: dict) -> None:
    r = ray2["clean"]
    assert ray2["ray_nodes_before"] == 2
    assert r["rc"] == 0, r["stderr"][-5000:]
    assert "zeroshot_top1" in r["stdout"]  # eval ran after pretraining
    tags = r["tracked"]["tags"]
    # One worker per node (STRICT_SPREAD), each rank's host name recorded in rank order.
    hosts = tags["filipctl.hosts"].split(",")
    assert sorted(hosts) == ["filip-n1", "filip-n2"] and tags["filipctl.nodes"] == "2", tags
    # The rendezvous is Ray Train's rank-0 worker, on the bridge: never 127.0.0.1 or the login host (10.77.0.1).
    master, _, port = tags["filipctl.rendezvous"].rpartition(":")
    assert master == ADDRESS[hosts[0]] and int(port) > 0, tags
    print(f"ranks on {hosts}, rendezvous {tags['filipctl.rendezvous']}, run took {r['elapsed_s']:.0f} s")
    # The same recipe as 2 local processes (conftest.longer_overrides): the same loss curve, bit for bit, which needs
    # the same threads per rank.
    from mlflow.tracking import MlflowClient

    local_tags = MlflowClient(local_run["uri"]).get_run(local_run["pretrain_run"]).data.tags
    assert tags["filipctl.world_size"] == local_tags["filipctl.world_size"] == "2"
    assert tags["filipctl.torch_threads"] == local_tags["filipctl.torch_threads"], (tags, local_tags)
    assert curve(r) == local_run["losses"] and sorted(curve(r)) == [5 * i for i in range(1, 9)]
    assert len(set(curve(r).values())) == 8  # the curve moves: equality is not vacuous


def test_workers_no_node_can_hold_are_refused_before_anything_is_written(ray2: dict) -> None:
    """4 CPUs in all hold each request; no 2-CPU node does as asked (totals alone let these through)."""
    expected = {"one_3cpu_worker": "1 worker x {'CPU': 3.0} cannot be placed on the Ray cluster's 2 nodes with "
                                   "placement_strategy STRICT_SPREAD: no node can hold even one",
                "strict_pack_2x2": "STRICT_PACK puts all 2 on one node, and a node holds 1 at most"}
    for attempt in ray2["refuse"]:
        err = attempt["stderr"]
        assert expected[attempt["case"]] in err and "(nodes: 10.77.0.11 CPU 2, 10.77.0.12 CPU 2)" in err, attempt
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert attempt["written"] == [] and attempt["seconds"] < 60, attempt
        assert attempt["rc"] == 2, attempt  # cannot run where it is sent: errors.CannotRun
        print(f"refused in {attempt['seconds']:.1f} s: {err.strip()}")


def test_lost_node_resumes_from_the_last_checkpoint_when_it_is_back(ray2: dict) -> None:
    r, clean = ray2["lost"], ray2["clean"]
    kill = r["kill"]
    assert kill, "the run ended before it reached the step to kill at"
    assert [kill[k]["rc"] for k in ("kill", "ray_up")] == [0, 0], kill
    assert kill["ray_nodes_after"] == 2
    assert r["rc"] == 0, r["stderr"][-5000:]
    # What each rank had done when filip-n2 went, and where the restarted group began.
    at_kill = max(kill["beats"].values())
    resumed = [e for e in r["events"] if e["message"].startswith("resumed from ray checkpoint")]
    assert len(resumed) == 1, [e["message"] for e in r["events"]]
    step = int(resumed[0]["message"].rsplit("(step", 1)[1].rstrip(")"))
    lost = at_kill - step
    to_resume = resumed[0]["t"] - kill["t"]
    after_back = resumed[0]["t"] - kill["t_back"]
    final, clean_final = r["tracked"]["metrics"]["final_loss"], clean["tracked"]["metrics"]["final_loss"]
    print(f"lost node: killed filip-n2 at step {at_kill} ({kill['after_s']:.0f} s into the run), back after "
          f"{kill['t_back'] - kill['t']:.0f} s; resumed from step {step}: {lost} steps lost, {to_resume:.0f} s from "
          f"kill to resume ({after_back:.0f} s after the node was back); final loss {final!r} vs {clean_final!r} "
          f"uninterrupted; run took {r['elapsed_s']:.0f} s")
    assert 10 <= step <= at_kill and 0 <= lost <= 10  # at most one checkpoint interval (train.checkpoint_every)
    assert to_resume > kill["down_s"]  # the group waited for its second node (STRICT_SPREAD): it did not start on one
    assert r["result"]["steps_run"] == 40 - step  # it did not start over
    # The data position came back with the checkpoint: the whole curve equals the uninterrupted run's, bit for bit.
    assert curve(r) == curve(clean) and final == clean_final
    # MLflow shows what happened: one loss per step, the restart, from which step and why the attempt before failed.
    t = r["tracked"]
    assert t["status"] == "FINISHED" and t["loss_records"] == 8, t
    assert t["tags"]["filipctl.restarts"] == "1" and t["metrics"]["restarts"] == 1, t["tags"]
    assert t["tags"]["filipctl.restart.1"].startswith(f"from step {step}: ") and "closed" in t["tags"]["filipctl.restart.1"]
    assert sorted(t["tags"]["filipctl.hosts"].split(",")) == ["filip-n1", "filip-n2"]  # the new group spans both again
    assert "restart 1 of 2 (Ray Train FailureConfig): resuming from step" in r["stdout"] + r["log"]
