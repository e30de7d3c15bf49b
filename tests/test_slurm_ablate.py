"""`filipctl ablate --cluster slurm` on the real single-node cluster (scripts/slurm-up.sh): the whole stage
graph is queued at once with afterok, and a variant whose pretraining fails takes down only its own eval.

The failing component is `train.precision: fp16`: it validates (fp16 is a legal precision), but DeepSpeed
refuses it on a CPU at engine start ("Type fp16 is not supported on your device"), so the failure
happens inside the pretraining job on the node, not before anything is queued.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.slurm_util import my_queue, sacct, slurm_cluster, wait_for  # noqa: F401 (slurm_cluster: autouse)

pytestmark = pytest.mark.slow

COMPONENTS = "late_interaction,broken"
OK = ("baseline", "+late_interaction")
FAILED = ("+broken", "+late_interaction+broken")
SETTINGS = (*OK, *FAILED)


def never_ran(acct: dict[str, str]) -> bool:
    return acct["start"] in ("None", "Unknown") or acct["start"] == acct["end"]


def test_ablation_queues_whole_graph_and_a_failed_variant_takes_down_only_its_eval(
        tmp_path: Path, tiny: list[str]) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(f"extends: {ROOT / 'recipes/ablation.yaml'}\n"
                      "name: ablation-broken\n"
                      "ablation:\n"
                      "  components:\n"
                      "    broken: {train.precision: fp16}  # validates; DeepSpeed refuses fp16 on a CPU\n")
    t0 = time.monotonic()
    res = run_cli("ablate", str(recipe), "--components", COMPONENTS, "--cluster", "slurm", *tiny,
                  cwd=tmp_path, timeout=1500)
    elapsed = time.monotonic() - t0
    print(f"filipctl ablate on slurm: {elapsed:.0f} s")
    both = res.stdout + res.stderr

    # 4. It exits 1, after printing the table, naming exactly the settings with a failed variant.
    assert res.returncode == 1, both
    assert "Traceback" not in res.stderr, res.stderr
    assert f"settings with a failed variant: {', '.join(FAILED)} " in res.stderr, res.stderr

    # 1. The whole graph queued at once: 1 data + (pretrain, eval) for each of the 4 settings.
    queued_line = next((ln for ln in res.stdout.splitlines() if ln.startswith("queued: ")), None)
    assert queued_line, res.stdout
    queued = re.findall(r"(\w+) = job (\d+)", queued_line)
    assert Counter(stage for stage, _ in queued) == {"data": 1, "pretrain": 4, "eval": 4}, queued_line
    queued_ids = {job for _, job in queued}
    assert len(queued_ids) == 9, queued_line

    # MLflow: the ablation parent, its 4 variant runs, each with its data/pretrain/eval stage runs and job ids.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("filip").experiment_id
    (parent,) = client.search_runs([exp_id], "tags.`filipctl.kind` = 'ablation'")
    variants = {v.data.tags["filipctl.variant"]: v
                for v in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(variants) == sorted(SETTINGS)
    jobs: dict[str, dict[str, str]] = {}  # setting -> stage -> "<slurm id>@<folder>"
    for setting, v in variants.items():
        stages = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{v.info.run_id}'")
        jobs[setting] = {s.data.tags["filipctl.stage"]: s.data.tags["filipctl.job_id"] for s in stages}
        assert sorted(jobs[setting]) == ["data", "eval", "pretrain"], jobs[setting]
    ids = {setting: {stage: j.split("@")[0] for stage, j in js.items()} for setting, js in jobs.items()}
    assert len({i["data"] for i in ids.values()}) == 1  # one data job shared by every variant
    assert {j for i in ids.values() for j in i.values()} == queued_ids

    # 5. (first: let every job leave squeue, so sacct has its final state) Nothing of ours is left queued.
    wait_for(lambda: not any(q.split()[0] in queued_ids for q in my_queue()), 120,
             "the ablation's jobs to leave the queue (COMPLETING)")

    data = sacct(ids["baseline"]["data"])
    assert data["state"] == "COMPLETED", data
    acct = {(setting, stage): sacct(job) for setting, i in ids.items() for stage, job in i.items() if stage != "data"}
    # 1. (sacct) every job was submitted before the data job ended: nothing waited for a stage to end
    # before being queued; Slurm held them (afterok), and none started before the data ended.
    for (setting, stage), a in acct.items():
        assert a["submit"] <= data["end"], (setting, stage, a, data)
    latest_submit = max(a["submit"] for a in acct.values())
    assert latest_submit < data["end"], (latest_submit, data)
    for setting in SETTINGS:
        pre = acct[(setting, "pretrain")]
        assert pre["start"] >= data["end"], (setting, pre, data)

    # 3. The fp16 pretrainings FAILED on the node, and only their own evals were cancelled, never started.
    for setting in FAILED:
        pre = acct[(setting, "pretrain")]
        assert pre["state"] == "FAILED", (setting, pre)
        ev = wait_for(lambda: (a := sacct(ids[setting]["eval"]))["state"] == "CANCELLED" and a, 60,
                      f"{setting} eval to read CANCELLED")
        assert never_ran(ev), (setting, ev)
        slurm_id, folder = jobs[setting]["pretrain"].split("@")
        err = "".join(p.read_text(errors="replace") for p in Path(folder).glob(f"{slurm_id}_*_log.*"))
        assert "Type fp16 is not supported on your device" in err, err[-3000:]  # the failure we meant
    for setting in OK:
        for stage in ("pretrain", "eval"):
            assert acct[(setting, stage)]["state"] == "COMPLETED", (setting, stage, acct[(setting, stage)])
        assert acct[(setting, "eval")]["start"] >= acct[(setting, "pretrain")]["end"]
    cancelled = {job for i in ids.values() for job in i.values() if sacct(job)["state"] == "CANCELLED"}
    assert cancelled == {ids[s]["eval"] for s in FAILED}

    # 4. The table on stdout: a row per setting, exactly the failed ones marked.
    rows = {}
    for line in res.stdout.splitlines():
        m = re.match(r"^[│|┃]\s*(baseline|\+[\w+]+)( \(failed\))?\s*[│|┃]", line)
        if m:
            rows[m.group(1)] = bool(m.group(2))
    assert rows == {s: s in FAILED for s in SETTINGS}, res.stdout
    # ... and on MLflow: the parent's ablation.json, and how each run ended.
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "ablation.json", str(tmp_path))).read_text())
    assert [r["setting"] for r in table["rows"]] == list(SETTINGS)
    assert {r["setting"]: r["failed"] for r in table["rows"]} == {s: s in FAILED for s in SETTINGS}
    for r in table["rows"]:
        assert (r["i2t_R1"] is None) == (r["setting"] in FAILED), r
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    for setting, v in variants.items():
        assert client.get_run(v.info.run_id).info.status == ("FAILED" if setting in FAILED else "FINISHED"), setting
    assert "i2t_R1" in client.get_run(variants["baseline"].info.run_id).data.metrics

    # 5. The queue is empty at the end.
    assert not any(q.split()[0] in queued_ids for q in my_queue()), my_queue()
