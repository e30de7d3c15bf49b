"""--dry-run says, for each stage, where it would run and the rendezvous its workers would use."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ROOT, run_cli


def placements(tmp_path: Path, *args: str) -> dict[str, str]:
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), "--dry-run", "--set", f"output_dir={tmp_path}/runs",
                  *args, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    stage, found = "", {}
    for line in res.stdout.splitlines():
        if line.startswith("# "):
            stage = line.split()[1]
        elif line.startswith("  runs on "):
            found[stage] = line.removeprefix("  runs on ")
    assert not (tmp_path / "runs").exists()  # a plan writes nothing
    return found


def test_slurm_plan_names_the_nodes_and_the_first_node_rendezvous(tmp_path: Path) -> None:
    where = placements(tmp_path, "--cluster", "slurm", "--set", "cluster.slurm.nodes=2",
                       "--set", "cluster.slurm.tasks_per_node=1", "--set", "cluster.slurm.partition=debug")
    assert set(where) == {"data", "pretrain", "eval"}
    assert where["data"].startswith("Slurm: 1 task on 1 node of partition debug")
    pre = where["pretrain"]
    assert pre.startswith("Slurm: 2 node(s) x 1 task(s) of partition debug") and "filip-n[1-2]" in pre, pre
    assert "rendezvous the first node of the allocation" in pre


def test_ray_plan_names_the_cluster_placement_group_and_rank0_rendezvous(tmp_path: Path) -> None:
    where = placements(tmp_path, "--cluster", "ray", "--set", "cluster.ray.address=10.77.0.11:6379",
                       "--set", "cluster.ray.workers=2", "--set", "cluster.ray.resources_per_worker={CPU: 2}")
    pre = where["pretrain"]
    assert pre.startswith("Ray Train: 2 workers x {'CPU': 2.0} in one placement group") and "10.77.0.11:6379" in pre
    assert "rendezvous the rank-0 worker's node" in pre
    assert where["data"] == "Ray: a Ray task (the Ray cluster at 10.77.0.11:6379)"


def test_local_plan_is_this_machine_on_loopback(tmp_path: Path) -> None:
    where = placements(tmp_path)
    assert where["pretrain"].startswith("this machine, 2 processes (torchrun); rendezvous 127.0.0.1")
