"""Reproducibility: a run rebuilt from MLflow alone reruns bit for bit; `filipctl diff` names exactly what differs.

Real runs through the CLI (tiny sizes), the real git clone this suite runs from (the rebuilt source is a
worktree of it at the recorded commit, with the recorded uncommitted changes applied), a real MLflow store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow
SMOKE = str(ROOT / "recipes/smoke.yaml")


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """An installed distribution as importlib.metadata sees one: a .dist-info folder on the path."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _diff(tmp_path: Path, a: str, b: str) -> dict[str, list[dict]]:
    res = run_cli("diff", a, b, "--json", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["differences"]


def _records_what_rebuilds_it(tmp_path: Path, run_id: str) -> None:
    """Patch, code digest, data digest and dataset inputs, environment: each on the run as MLflow holds it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    tags = run.data.tags
    from filipctl.tracking.provenance import git_state, source_patch

    assert tags["filipctl.git_commit"] == git_state()["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    patch, _ = source_patch()
    if patch:  # a development tree: the uncommitted changes travel with the run
        logged = Path(client.download_artifacts(run.info.run_id, "source.patch", str(tmp_path))).read_bytes()
        assert logged == patch and len(tags["filipctl.git_patch_sha256"]) == 16
    else:
        assert "source.patch" not in artifacts and tags["filipctl.git_patch_sha256"] == ""
    assert len(tags["filipctl.code_digest"]) == 16 and len(tags["filipctl.data_digest"]) == 64
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval"} and inputs["train"].name == str(tmp_path / "data" / "train")
    assert json.loads(inputs["train"].profile) == {"shards": 2, "samples": 200}
    index = json.loads(next((tmp_path / "runs" / "stages").glob("data-*/data.json")).read_text())
    assert index["digest"] == tags["filipctl.data_digest"]
    assert all(d.startswith("sha256:") and len(d) == 71 for d in index["train"][0]["digests"])


def test_reproduce_verify_then_diff_names_exactly_what_changed(tmp_path: Path, tiny: list[str]) -> None:
    uri = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    res = run_cli("run", SMOKE, *tiny, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    original = json.loads(res.stdout)["run_id"]
    _records_what_rebuilds_it(tmp_path, original)
    # The same command again reuses every stage; its record points at the runs that made them (their loss curve).
    res = run_cli("run", SMOKE, *tiny, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    from mlflow.tracking import MlflowClient

    from filipctl.orchestration import reproduce as rp

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first, cached = (rp.load_record(client, client.get_run(r)) for r in (original, json.loads(res.stdout)["run_id"]))
    assert cached.stages["pretrain"].info.run_id == first.stages["pretrain"].info.run_id
    assert rp.verify(client, first, cached).identical

    # 1. Rebuilt from MLflow (commit + patch worktree, recorded recipe) and rerun into a fresh folder, with one
    #    more package installed than the original had: the environment check names it; the numbers do not move.
    site = tmp_path / "site"
    _fake_distribution(site, "filipctl-probe", "2.0")
    res = run_cli("reproduce", original[:8], "--verify", "--json", "--folder", str(tmp_path / "again"), *uri,
                  cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["identical"] is True and report["verdict"][0].startswith("identical: 2 logged losses"), report
    assert report["environment_differences"] == [["filipctl-probe", None, "2.0"]]
    assert "environment differs: filipctl-probe (absent) -> 2.0" in res.stderr
    assert not (tmp_path / "again" / "source").exists()  # the worktree is removed after the rerun
    rerun = report["rerun"]
    assert list((tmp_path / "again" / "runs" / "stages").glob("pretrain-*/model.pt"))  # a fresh folder, not a cache

    # 2. diff names exactly the one package; a rerun with one recipe key changed, exactly that key.
    found = _diff(tmp_path, original[:8], rerun[:8])
    assert {k: v for k, v in found.items() if v} == {"packages": [{"name": "filipctl-probe", "a": None, "b": "2.0"}]}
    res = run_cli("run", SMOKE, *tiny, "--set", "optim.weight_decay=0.05", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    changed = json.loads(res.stdout)["run_id"]
    found = _diff(tmp_path, original[:8], changed[:8])
    assert {k: v for k, v in found.items() if v} == {"recipe": [{"name": "optim.weight_decay", "a": "0.03", "b": "0.05"}]}
    table = run_cli("diff", original[:8], changed[:8], *uri, cwd=tmp_path)
    assert table.returncode == 0 and "optim.weight_decay" in table.stdout and "0.05" in table.stdout

    # 3. The verdict on runs that differ: the first differing step and the size of the difference.
    a, b = rp.load_record(client, client.get_run(original)), rp.load_record(client, client.get_run(changed))
    verdict = rp.verify(client, a, b)
    # the first logged step whose loss differs (a small weight-decay change may leave the first window's mean alone)
    la, lb = rp._losses(client, a), rp._losses(client, b)
    first = min(s for s in la if la[s] != lb.get(s))
    assert not verdict.identical and verdict.lines[0].startswith(f"loss first differs at step {first}:"), verdict.lines
    assert "difference" in verdict.lines[0]


def test_the_source_patch_rebuilds_every_kind_of_change(tmp_path: Path) -> None:
    """CRLF text, a binary file, a deleted file, an untracked file that is not UTF-8: the patch is bytes, and a
    worktree at the commit with it applied holds exactly the changed tree; a large untracked file is named."""
    import subprocess

    from filipctl.tracking import provenance

    repo = tmp_path / "repo"
    repo.mkdir()
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                       capture_output=True)
    git("init", "-q")
    (repo / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (repo / "gone.py").write_text("x = 1\n")
    (repo / "blob.bin").write_bytes(bytes(range(256)))
    git("add", "-A")
    git("commit", "-q", "-m", "base")
    (repo / "crlf.txt").write_bytes(b"one\r\nTWO\r\nthree\r\n")
    (repo / "gone.py").unlink()
    (repo / "blob.bin").write_bytes(bytes(range(255, -1, -1)) * 2)
    (repo / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    (repo / "big.dat").write_bytes(b"\0" * (provenance.UNTRACKED_LIMIT + 1))
    patch, left_out = provenance.source_patch(repo)
    assert isinstance(patch, bytes) and left_out == ["big.dat"]
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(tmp_path / "wt"), "HEAD"],
                   check=True, capture_output=True)
    subprocess.run(["git", "-C", str(tmp_path / "wt"), "apply", "-"], input=patch, check=True, capture_output=True)
    for name in ("crlf.txt", "blob.bin", "latin1.txt"):
        assert (tmp_path / "wt" / name).read_bytes() == (repo / name).read_bytes(), name
    assert not (tmp_path / "wt" / "gone.py").exists() and not (tmp_path / "wt" / "big.dat").exists()
