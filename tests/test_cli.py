"""The CLI as a user meets it: fast help, one clear message on bad input, and a real end-to-end run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FILIPCTL, ROOT, longer_overrides, run_cli

HEAVY = ("torch", "ray", "deepspeed", "mlflow")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["recipe", "validate", "recipes/smoke.yaml"]])
def test_light_commands_import_no_heavy_library(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        f"sys.argv = ['filipctl', *{argv!r}]\n"
        "from filipctl.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], 'CODE', code)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "HEAVY [] CODE 0" in res.stdout, res.stdout + res.stderr


BAD_INPUTS = {
    "unknown key": (["recipes/smoke.yaml", "--set", "train.stepz=3"], ["recipes/smoke.yaml", "train.stepz", "unknown key"]),
    "wrong type": (["recipes/smoke.yaml", "--set", "train.steps=lots"], ["train.steps", "integer", "'lots'"]),
    "missing file": (["recipes/missing.yaml"], ["recipes/missing.yaml", "not found"]),
    "bad --set": (["recipes/smoke.yaml", "--set", "train.steps"], ["--set", "KEY.PATH=VALUE"]),
    "unknown cluster": (["recipes/smoke.yaml", "--cluster", "mars"], ["--cluster mars", "no profile mars.yaml", "slurm"]),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_one_message_no_traceback_nothing_written(name: str, tmp_path: Path) -> None:
    args, expected = BAD_INPUTS[name]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "smoke.yaml").write_text((ROOT / "recipes" / "smoke.yaml").read_text())
    res = run_cli("run", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.count("error:") == 1
    for fragment in expected:
        assert fragment in res.stderr, (fragment, res.stderr)
    # Nothing half-written: no MLflow store, no run folder, no dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_status_without_a_store_says_how_to_start(tmp_path: Path) -> None:
    res = run_cli("status", cwd=tmp_path)
    assert res.returncode == 1 and "filipctl run" in res.stderr and "Traceback" not in res.stderr


def _mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # with tests/test_slurm.py, which shares conftest.local_run
def test_run_end_to_end_then_interrupt_and_resume(local_run: dict, tmp_path: Path) -> None:
    # 1. A full run through the CLI (the session's straight local run, conftest.local_run): data -> 2-worker
    #    DeepSpeed pretraining with 2 loader workers per rank and both augmentations -> eval.
    res, home = local_run["res"], local_run["folder"]
    assert "zeroshot_top1" in res.stdout and "i2t_R1" in res.stdout and "mlflow ui" in res.stdout

    client = _mlflow_client(home)
    exp = client.get_experiment_by_name("filip")
    parents = client.search_runs([exp.experiment_id], "tags.`filipctl.kind` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.steps"] == "40" and parent.data.params["model.interaction"] == "late"
    assert len(parent.data.tags["filipctl.git_commit"]) in (40, 7) or parent.data.tags["filipctl.git_commit"] == "unknown"
    assert parent.data.tags["filipctl.git_dirty"] in ("true", "false", "unknown")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "versions.json"} <= artifacts
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {c.data.tags["filipctl.stage"]: c for c in children}
    assert set(by_stage) == {"data", "pretrain", "eval"}
    assert all(c.info.status == "FINISHED" for c in children)
    pre = by_stage["pretrain"]
    # the stage's done record names the run that holds its loss curve (for runs that reuse it later)
    done = json.loads((Path(pre.data.tags["filipctl.workdir"]) / "done.json").read_text())
    assert done["mlflow_run"] == pre.info.run_id and done["digests"]["model.pt"] and done["metrics"]["final_loss"] > 0
    losses = client.get_metric_history(pre.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [5 * i for i in range(1, 9)]
    assert all(m.value == m.value for m in losses)  # finite, logged per step
    assert {"model", "deepspeed_config.json"} <= {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert pre.data.tags["filipctl.world_size"] == "2" and pre.data.tags["filipctl.torch_threads"] == "1"
    versions = json.loads(Path(client.download_artifacts(parent.info.run_id, "versions.json", str(tmp_path))).read_text())
    assert versions["torch"] == "2.14.1" and "mlflow" in versions and len(versions) > 100  # every distribution
    ev = by_stage["eval"].data.metrics
    assert 0.0 <= ev["zeroshot_top1"] <= 1.0 and "t2i_R10" in ev

    # 2. `filipctl status` shows the run and its stages; --json for scripts.
    st = run_cli("status", "--tracking-uri", local_run["uri"], "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    rows = json.loads(st.stdout)
    assert rows[0]["recipe"] == "smoke" and rows[0]["backend"] == "local" and rows[0]["state"] == "COMPLETED"
    assert [s["stage"] for s in rows[0]["stages"]] == ["data", "pretrain", "eval"]
    table = run_cli("status", "--tracking-uri", local_run["uri"], cwd=tmp_path)
    assert "pretrain" in table.stdout and "COMPLETED" in table.stdout and "zeroshot_top1" in table.stdout
    # a stage's duration counts from when it started running: eval's is far shorter than the whole run's
    durations = {s["stage"]: s["duration_s"] for s in rows[0]["stages"]}
    assert 0 < durations["eval"] < rows[0]["duration_s"] / 2, (durations, rows[0]["duration_s"])
    # status reads the state index the run kept beside the store: the same rows, without importing MLflow.
    probe = ("import json, sys\n"
             f"sys.argv = ['filipctl', 'status', '--json', '--tracking-uri', '{local_run['uri']}']\n"
             "from filipctl.cli.app import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('MLFLOW', 'mlflow' in sys.modules, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "MLFLOW False" in res.stderr, res.stderr
    fast = json.loads(res.stdout)
    from filipctl.orchestration.status import rows_from_mlflow

    from_mlflow = rows_from_mlflow(client, "filip", 10)
    assert [(r["run_id"], r["state"], [(s["stage"], s["state"], s["value"]) for s in r["stages"]]) for r in fast] == \
        [(r["run_id"], r["state"], [(s["stage"], s["state"], s["value"]) for s in r["stages"]]) for r in from_mlflow]

    # 2b. `filipctl eval` on the finished run, without retraining: clip_benchmark JSON per set and task.
    from tests.benchmark_sets import classification_set, retrieval_set

    classification_set(tmp_path / "bench" / "wds_cls", {"train": 48, "test": 24}, templates=["a photo of a {c}."])
    retrieval_set(tmp_path / "bench" / "wds_ret", 16, captions_per_image=3)
    uri = ["--tracking-uri", local_run["uri"]]
    res = run_cli("eval", parent.info.run_id[:8], "-d", "bench/wds_cls", "-d", str(tmp_path / "bench" / "wds_ret"),
                  *uri, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert not report["cached"]
    files = sorted(p.name for p in (Path(report["folder"]) / "results").glob("*.json"))
    tasks = {(r["dataset"], r["task"]) for r in report["results"]}
    assert tasks == {("held_out", "zeroshot_retrieval"), ("held_out", "zeroshot_classification"),
                     ("held_out", "word_patch_pointing"), ("held_out", "finegrained_retrieval"),
                     ("wds/wds_cls", "zeroshot_classification"),  # clip_benchmark's --dataset: wds/<name>
                     ("wds/wds_cls", "linear_probe"), ("wds/wds_ret", "zeroshot_retrieval")}
    for r in report["results"]:
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}  # clip_benchmark's dump
        # its file name: the dataset without wds/
        assert f"{r['dataset'].removeprefix('wds/')}_{r['pretrained']}_{r['model']}_en_{r['task']}.json" in files
    ret = next(r["metrics"] for r in report["results"] if r["dataset"] == "wds/wds_ret")
    assert set(ret) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    # The same checkpoint and code: the held-out figures equal those of the run's own eval stage.
    assert {k: report["metrics"][k] for k in ev if k in report["metrics"]} == {k: v for k, v in ev.items()
                                                                                  if k in report["metrics"]}
    eval_run = client.get_run(report["run_id"])
    assert eval_run.info.status == "FINISHED" and eval_run.data.tags["filipctl.evaluated"] == parent.info.run_id
    stage_run = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{report['run_id']}'")[0]
    logged = {a.path for a in client.list_artifacts(stage_run.info.run_id, "clip_benchmark")}
    assert {f"clip_benchmark/{f}" for f in files} == logged
    assert len(client.list_artifacts(stage_run.info.run_id, "alignment/held_out")) == 8
    assert stage_run.data.metrics["wds_cls.lp_acc1"] == next(
        r["metrics"]["lp_acc1"] for r in report["results"] if r["task"] == "linear_probe")
    again = run_cli("eval", parent.info.run_id[:8], "-d", "bench/wds_cls", "-d", str(tmp_path / "bench" / "wds_ret"),
                    *uri, cwd=tmp_path)
    assert again.returncode == 0 and "cached" in again.stdout and "eval: wds_ret" in again.stdout, again.stdout
    missing = run_cli("eval", parent.info.run_id[:8], "-d", "bench/nope", *uri, cwd=tmp_path)
    assert missing.returncode != 0 and "bench/nope" in missing.stderr and "Traceback" not in missing.stderr

    # 3. The same recipe in a folder and store of its own (no eval: what is compared is the loss curve),
    #    interrupted (Ctrl-C) after its first checkpoint ...
    longer = [*longer_overrides(tmp_path), "--set", "eval.enabled=false"]
    proc = subprocess.Popen([*FILIPCTL, "run", str(ROOT / "recipes/smoke.yaml"), *longer], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"},
                            # As from a terminal: a shell without job control that started this
                            # suite in the background hands its children SIGINT ignored.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "runs"
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in runs.glob("stages/pretrain-*/checkpoints/latest") if "step10" in p.read_text()]
        if found:
            latest = found[0]
            break
        time.sleep(0.2)
    assert latest is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err and "Traceback" not in err
    client = _mlflow_client(tmp_path)
    exp = client.get_experiment_by_name("filip")
    killed = client.search_runs([exp.experiment_id], "tags.`filipctl.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"])[0]
    assert killed.info.status == "KILLED"
    saved = int(latest.read_text().strip().removeprefix("step"))
    assert saved < 40

    # ... then the same command resumes from that checkpoint, data position included, and finishes ...
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *longer, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {latest.parent}/step{saved}" in res.stdout and "data restarts" not in res.stdout
    summary = json.loads((latest.parent.parent / "result.json").read_text())["metrics"]
    assert summary["steps_run"] == 40 - saved

    # ... in the same MLflow run (one run per stage, moved under the pipeline that finished it, the resume
    # recorded), whose one loss curve is bitwise identical to the uninterrupted run of the same recipe and seed.
    pipelines = client.search_runs([exp.experiment_id], "tags.`filipctl.kind` = 'pipeline'",
                                   order_by=["attributes.start_time ASC"])
    (stage_run,) = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
    assert stage_run.data.tags["mlflow.parentRunId"] == pipelines[-1].info.run_id
    assert stage_run.data.tags["filipctl.resumes"] == "1" and stage_run.info.status == "FINISHED"
    history = client.get_metric_history(stage_run.info.run_id, "loss")
    straight = local_run["losses"]
    assert sorted(straight) == [5 * i for i in range(1, 9)] and {m.step for m in history} == set(straight)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps))  # the resumed attempt did not log again what the interrupted one had
    for m in history:
        assert m.value == straight[m.step], (m.step, m.value, straight[m.step])
    assert len(set(straight.values())) == len(straight)  # the curve moves: equality is not vacuous


def test_error_quoting_a_log_with_brackets_is_printed_as_text(tmp_path: Path) -> None:
    # Log tails in stage errors quote paths like "[/__w/pytorch/.../pair.cc:561]": not rich markup.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: '[/__w/pair.cc:561]'}\n")
    res = run_cli("recipe", "validate", str(recipe), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "MarkupError" not in res.stderr, res.stderr
    assert res.stderr.count("error:") == 1 and "'[/__w/pair.cc:561]'" in res.stderr
