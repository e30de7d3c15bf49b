"""A multi-node run whose folders are on one node's own disk is refused before anything is queued."""

from __future__ import annotations

from pathlib import Path

import pytest

from filipctl.errors import FilipctlError
from filipctl.orchestration.shared_storage import check_shared_storage, mount_of, mounts, node_local
from filipctl.schema import Recipe
from tests.conftest import ROOT, overrides_in, run_cli

# A login node's mounts: the root disk, node-local scratch, Lustre for projects, NFS homes, a path with a space.
MOUNTINFO = """\
22 1 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 27 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw
40 27 0:40 / /scratch/local rw,relatime - xfs /dev/nvme0n1 rw
41 27 0:41 / /lustre rw,relatime - lustre 10.0.0.5@o2ib:/fs rw
42 27 0:42 / /home rw,relatime - nfs4 nas:/export/home rw
43 41 0:43 / /lustre/cache rw,relatime - tmpfs tmpfs rw
44 27 0:44 / /mnt/team\\040data rw,relatime - nfs nas:/team rw
"""
TABLE = mounts(MOUNTINFO)


@pytest.mark.parametrize("path, point, fstype", [
    ("/lustre/proj/runs", "/lustre", "lustre"),
    ("/lustre/cache/x", "/lustre/cache", "tmpfs"),  # a mount inside a mount: the deepest one holds the path
    ("/home/ana/runs", "/home", "nfs4"),
    ("/tmp/runs", "/", "ext4"),
    ("/mnt/team data/runs", "/mnt/team data", "nfs"),  # mountinfo's octal escape for a space
])
def test_the_mount_holding_a_path(path: str, point: str, fstype: str) -> None:
    m = mount_of(Path(path), TABLE)
    assert m is not None and (str(m.point), m.fstype) == (point, fstype)


@pytest.mark.parametrize("location, shared, local", [
    ("/lustre/proj/runs", [], None),
    ("/home/ana/runs", [], None),
    ("s3://bucket/ray", [], None),
    ("/scratch/local/runs", [], "this machine's xfs file system (mounted at /scratch/local)"),
    ("/dev/shm/runs", [], "this machine's tmpfs file system (mounted at /dev/shm)"),
    ("/tmp/x/runs", [], "this machine's ext4 file system (mounted at /)"),
    ("/tmp/x/runs", ["/tmp/x"], None),  # the site says every node mounts it
    ("/tmp/xy/runs", ["/tmp/x"], "this machine's ext4 file system (mounted at /)"),  # a prefix is not a parent
])
def test_what_counts_as_node_local(location: str, shared: list[str], local: str | None) -> None:
    assert node_local(location, shared, TABLE) == local


def _recipe(**cluster: object) -> Recipe:
    return Recipe.model_validate({"name": "t", "output_dir": "/tmp/x/runs", "cluster": cluster,
                                  "data": {"train": [{"url": "/tmp/x/data/train"}], "eval": "/tmp/x/data/eval"}})


def test_only_runs_that_reach_other_machines_are_checked() -> None:
    local_disk = "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
    check_shared_storage(_recipe(backend="local"), [], local_disk)
    check_shared_storage(_recipe(backend="ray", ray={"address": "local"}), [], local_disk)
    with pytest.raises(FilipctlError, match=r"output_dir /tmp/x/runs is on this machine's ext4 .* \(Slurm compute "
                                            r"nodes, 2 per"):
        check_shared_storage(_recipe(backend="slurm", slurm={"nodes": 2}), [], local_disk)
    # One node per job still runs on a compute node, not here; the data it reads is checked too.
    with pytest.raises(FilipctlError, match=r"data.train /scratch/d/\{0..9\}.tar is on"):
        check_shared_storage(Recipe.model_validate({"name": "t", "output_dir": "/tmp/x/runs",
                                                    "data": {"train": [{"url": "/scratch/d/{0..9}.tar"}]},
                                                    "cluster": {"backend": "slurm", "shared_dirs": ["/tmp/x"]}}),
                             [], local_disk)
    with pytest.raises(FilipctlError, match=r"cluster.ray.storage_path /tmp/r is on .*Ray cluster at 10.0.0.1:6379"):
        check_shared_storage(_recipe(backend="ray", shared_dirs=["/tmp/x"],
                                     ray={"address": "10.0.0.1:6379", "storage_path": "/tmp/r"}), [], local_disk)
    check_shared_storage(_recipe(backend="ray", shared_dirs=["/tmp/x"],
                                 ray={"address": "10.0.0.1:6379", "storage_path": "s3://b/r"}), [], local_disk)


def test_a_two_node_slurm_run_on_a_local_disk_is_refused_with_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "node-local"
    sets = overrides_in(tmp_path, output_dir=out, **{"cluster.slurm.nodes": 2, "cluster.slurm.tasks_per_node": 1,
                                                      "cluster.shared_dirs": "[]"})  # the test profile shares /tmp
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "slurm", *sets, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    err = " ".join(res.stderr.split())
    assert f"output_dir {out} is on this machine's" in err and "cluster.shared_dirs" in err, err
    assert "Traceback" not in res.stderr
    assert not out.exists() and not (tmp_path / "data").exists()
