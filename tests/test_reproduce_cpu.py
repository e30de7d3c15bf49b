"""`reproduce --verify` across CPUs: a rerun that differs from an original recorded on another CPU model (or with
other vector instructions) says that this is why; on the same CPU the verdict is what it always was.

A real MLflow store holds two pipeline runs as filipctl records them (versions.json, recipe.yaml, a pretraining
child run with its loss curve); the original's stored versions.json names another CPU, as a run made on another
machine would. No training: what is tested is the decision, on records read back from the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filipctl.contract import TAG_KIND, TAG_PARENT, TAG_STAGE
from filipctl.orchestration import reproduce as rp
from filipctl.tracking.provenance import cpu_record, package_versions

AMD = {"cpu_model": "AMD EPYC 7B13 64-Core Processor", "cpu_isa": "sse4_2 avx avx2 fma"}


def test_cpu_record_reads_model_and_isa_flags() -> None:
    info = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse4_2 avx avx2 fma x\n"
    assert cpu_record(info) == AMD
    here = package_versions()
    assert here["cpu_model"] and here["cpu_model"] != "unknown" and "cpu_isa" in here


def _store_run(client, exp: str, tmp: Path, name: str, versions: dict, losses: list[float],
               trained_on: dict | None = None) -> str:
    """A pipeline run with its versions.json and recipe.yaml, and a pretrain child with the loss curve (tagged with
    the CPU its rank 0 computed on, as jobs/train/pretrain.py tags it, when `trained_on`)."""
    parent = client.create_run(exp, run_name=name, tags={TAG_KIND: "pipeline"}).info.run_id
    folder = tmp / name
    folder.mkdir()
    (folder / "versions.json").write_text(json.dumps(versions, indent=1))
    (folder / "recipe.yaml").write_text("name: smoke\n")
    client.log_artifact(parent, str(folder / "versions.json"))
    client.log_artifact(parent, str(folder / "recipe.yaml"))
    child = client.create_run(exp, run_name=f"{name}-pretrain",
                              tags={TAG_KIND: "stage", TAG_STAGE: "pretrain", TAG_PARENT: parent,
                                    **{f"filipctl.{k}": v for k, v in (trained_on or {}).items()}}).info.run_id
    for step, loss in enumerate(losses):
        client.log_metric(child, "loss", loss, step=step * 10)
    for run in (child, parent):
        client.set_terminated(run)
    return parent


@pytest.fixture
def store(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("filip", artifact_location=str(tmp_path / "artifacts"))
    return client, exp


def test_a_rerun_on_another_cpu_says_that_is_why(tmp_path: Path, store) -> None:
    client, exp = store
    here = package_versions()
    original = _store_run(client, exp, tmp_path, "original", {**here, **AMD}, [4.0, 3.5, 3.25])
    rerun = _store_run(client, exp, tmp_path, "rerun", here, [4.0, 3.5000002, 3.2500005])
    a, b = (rp.load_record(client, client.get_run(r)) for r in (original, rerun))
    assert a.versions["cpu_model"] == AMD["cpu_model"]

    verdict = rp.verify(client, a, b, here)
    assert not verdict.identical and verdict.cause == "cpu"
    assert verdict.lines[0].startswith("loss first differs at step 10:")
    why = verdict.lines[-1]
    assert why.startswith(f"why: the original ran on CPU {AMD['cpu_model']!r}, this rerun on {here['cpu_model']!r}")
    assert "bitwise identical on one machine type, not across CPUs" in why
    # Without `here`, the rerun's own record is this machine's: the same decision.
    assert rp.verify(client, a, b).cause == "cpu"


def test_same_model_other_vector_instructions_is_named_too() -> None:
    why = rp.cpu_difference(AMD, {**AMD, "cpu_isa": "sse4_2 avx avx2 fma avx512f"})
    assert why and "a CPU of the same name" in why and "only here: avx512f" in why


def test_same_cpu_or_unrecorded_cpu_keeps_the_plain_verdict(tmp_path: Path, store) -> None:
    client, exp = store
    here = package_versions()
    old = {k: v for k, v in here.items() if k not in rp.CPU_KEYS}  # a run recorded before the CPU was
    runs = {name: _store_run(client, exp, tmp_path, name, versions, losses) for name, versions, losses in (
        ("same", here, [4.0, 3.5, 3.25]), ("same-again", here, [4.0, 3.5, 3.25]),
        ("differs", here, [4.0, 3.5, 3.0]), ("unrecorded", old, [4.0, 3.5, 3.25]))}
    same, again, differs, unrecorded = (rp.load_record(client, client.get_run(r)) for r in runs.values())

    assert rp.verify(client, same, again, here) == rp.Verdict(True, [
        "identical: 3 logged losses and 0 eval metrics, bit for bit"])
    plain = rp.verify(client, same, differs, here)
    assert not plain.identical and plain.cause is None and len(plain.lines) == 1
    assert plain.lines[0].startswith("loss first differs at step 20: 3.25 vs 3.0")
    assert rp.verify(client, unrecorded, differs, {**here, **AMD}).cause is None


def test_on_a_cluster_the_nodes_cpu_counts_not_the_login_hosts(tmp_path: Path, store) -> None:
    """The command ran on one host (versions.json), the pretraining on nodes of another CPU (its stage tags): the
    nodes' CPUs are compared, whatever the hosts the two commands ran on."""
    client, exp = store
    here = package_versions()
    nodes = {"cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_isa": "sse4_2 avx avx2 fma avx512f amx_bf16"}
    runs = {name: _store_run(client, exp, tmp_path, name, here, losses, trained_on) for name, losses, trained_on in (
        ("original", [4.0, 3.5, 3.25], nodes), ("same-nodes", [4.0, 3.5, 3.0], nodes),
        ("amd-nodes", [4.0, 3.5, 3.0], AMD))}
    original, same, amd = (rp.load_record(client, client.get_run(r)) for r in runs.values())
    assert rp.cpu_of(original) == nodes
    assert rp.verify(client, original, same, here).cause is None  # login host and nodes alike: no CPU to blame
    why = rp.verify(client, original, amd, here)
    assert why.cause == "cpu" and repr(nodes["cpu_model"]) in why.lines[-1] and repr(AMD["cpu_model"]) in why.lines[-1]
