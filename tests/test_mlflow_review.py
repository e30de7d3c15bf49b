"""What a researcher sees in the MLflow UI after a real `filipctl ablate`: a real `mlflow server` on the store the run
wrote, read by headless Chromium (the Debian package) over the DevTools protocol. The pages are asserted on the text
they render, not on what the store holds: the experiment opens on the training runs, a pretraining run's charts and
system metrics, the logged model with its eval metrics, the ablation's variants grouped by setting. Screenshots go to
$FILIPCTL_SCREENSHOTS when set (they are for people; the assertions are on the DOM)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, tiny_in

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ML = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium tab driven over the DevTools protocol (aiohttp's websocket client: no new dependency)."""

    def __init__(self, profile: Path) -> None:
        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                      "--window-size=1600,2000", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect())
        self.ids = 0

    async def _connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, **params):
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.ids:
                assert "error" not in msg, msg
                return msg["result"]

    def call(self, method: str, **params):
        return self.loop.run_until_complete(self._call(method, **params))

    def js(self, expression: str):
        try:
            return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")
        except AssertionError:  # the page navigated while it evaluated: the caller's wait tries again
            return None

    def open(self, url: str, *wanted: str, timeout: float = 60) -> str:
        """Go to `url`, wait until the page's text holds every one of `wanted` -> that text."""
        self.call("Page.navigate", url=url)
        if "#" in url:  # the same document, another hash route: the app routes without a reload
            self.js("location.reload()")
        return self.wait(*wanted, timeout=timeout)

    def wait(self, *wanted: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if all(w in text for w in wanted) or time.monotonic() > deadline:
                return text
            time.sleep(0.3)

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("FILIPCTL_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            data = self.call("Page.captureScreenshot", format="png")["data"]
            (Path(folder) / f"{name}.png").write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.loop.run_until_complete(self.ws.close())
        self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_weights_become_one_logged_model_and_eval_metrics_link_to_it(tmp_path: Path, monkeypatch) -> None:
    """The spool's "model" record, sent twice (a resend after a crash), makes one READY logged model of the run;
    metrics logged with its weights' digest are the model's too, and the run that measured it names it as input."""
    from mlflow.tracking import MlflowClient

    from filipctl.contract import ENV_RUN_ID, ENV_SPOOL
    from filipctl.tracking.forwarder import drain
    from filipctl.tracking.spool import Spool
    from jobs.stage_logger import StageLogger

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    train, evaluation = (client.create_run(exp).info.run_id for _ in range(2))
    weights = tmp_path / "stage" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    monkeypatch.setenv(ENV_SPOOL, str(tmp_path / "train.jsonl"))
    monkeypatch.setenv(ENV_RUN_ID, train)
    for _ in range(2):
        StageLogger(True).model(str(weights), "filip", {"filipctl.weights_sha256": "abc"}, {"steps": "2"},
                                recipe={"name": "filip"})
    monkeypatch.setenv(ENV_SPOOL, str(tmp_path / "eval.jsonl"))
    StageLogger(True).metrics({"zeroshot_top1": 0.5}, model_sha256="abc")
    StageLogger(True).metrics({"other": 1.0}, model_sha256="not-logged")  # weights no run logged: the run's only
    assert drain([Spool(tmp_path / "train.jsonl", train), Spool(tmp_path / "eval.jsonl", evaluation)], client, 30) == 0

    (model,) = client.search_logged_models([exp])
    assert (model.source_run_id, model.name, str(model.status).rpartition(".")[2]) == (train, "filip", "READY")
    assert model.params == {"steps": "2"} and [(m.key, m.value, m.run_id) for m in model.metrics] == [
        ("zeroshot_top1", 0.5, evaluation)]
    assert sorted(a.path for a in client.list_logged_model_artifacts(model.model_id)) == ["model.pt", "recipe.json"]
    assert [o.model_id for o in client.get_run(train).outputs.model_outputs] == [model.model_id]
    assert [i.model_id for i in client.get_run(evaluation).inputs.model_inputs] == [model.model_id]
    assert client.get_run(evaluation).data.metrics == {"zeroshot_top1": 0.5, "other": 1.0}
    assert not list(weights.parent.glob(".logged-model-*"))  # the upload folder is gone, the weights stay
    assert weights.read_bytes() == b"weights"


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory):
    """A real 2-setting x 2-seed ablation (tiny: 2 steps a variant), an `mlflow server` on its store, a browser."""
    # Not a skip: the suite's set-up (scripts/test.sh -> slurm-up.sh) installs it, so its absence is a failure.
    assert CHROMIUM is not None, "needs the Debian chromium package: bash scripts/slurm-up.sh installs it"
    folder = tmp_path_factory.mktemp("review")
    sets = tiny_in(folder, **{"train.steps": 2, "train.checkpoint_every": 2, "tracking.system_metrics_interval_s": 1})
    res = run_cli("ablate", str(ROOT / "recipes/ablation.yaml"), "--components", "late_interaction",
                  "--seeds", "0,1", *sets, cwd=folder)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "#/experiments/1?workflowType=machine_learning" in res.stdout, res.stdout  # the link it prints
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=folder, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    profile = Path(tempfile.mkdtemp(prefix="filip-chromium-"))
    browser = None
    try:
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (folder / "server.log").read_text()
                time.sleep(0.3)
        browser = Browser(profile)
        yield {"uri": uri, "base": f"http://127.0.0.1:{port}", "browser": browser, "folder": folder}
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow  # a real ablation, an mlflow server and a browser: ~2-3 minutes
def test_the_mlflow_ui_shows_training_runs_charts_models_and_grouped_variants(reviewed) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(reviewed["uri"])
    exp = client.get_experiment_by_name("filip")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    b, base = reviewed["browser"], f"{reviewed['base']}/#/experiments/{exp.experiment_id}"
    pretrain = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`filipctl.kind` = 'ablation'")
    assert len(pretrain) == 4

    # 1. The experiment opens on its training runs: the runs table, not the GenAI overview (traces, "Detect issues").
    b.open(f"{base}?{ML}", "matching runs")
    b.js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")  # the assistant's panel: room for the table
    text = b.open(f"{base}?{ML}", "matching runs", parent.info.run_name)
    assert "matching runs" in text and "Run Name" in text and parent.info.run_name in text, text[:2000]
    assert "Detect Issues" not in text and "Token Usage" not in text, text[:2000]
    b.screenshot("runs_table")

    # 2. A pretraining run: its loss curve (constants such as global_batch are params, not one-point charts) ...
    run = pretrain[0]
    assert {"global_batch", "peak_lr"} <= set(run.data.params) and not {"global_batch", "peak_lr"} & set(run.data.metrics)
    curves = [f"pretrain ({k})" for k in ("loss", "lr", "temperature", "step_time_s")]  # a drawn chart's legend
    text = b.open(f"{base}/runs/{run.info.run_id}/model-metrics?{ML}", *curves)
    assert all(k in text for k in curves), text[:2000]
    assert "global_batch" not in text and "peak_lr" not in text, text[:2000]
    assert "Evaluations" not in text.split("pretrain")[0], text[:300]  # the breadcrumb says runs
    b.screenshot("pretrain_charts")
    # ... and its system metrics, per node: a section named system/<node id> with CPU and memory charts.
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert len(nodes) == 1, run.data.metrics  # one local node, sampled once a second during the run
    (node,) = nodes
    text = b.open(f"{base}/runs/{run.info.run_id}/system-metrics?{ML}", "cpu_utilization_percentage)",
                  "system_memory_usage_megabytes)")
    assert f"system/{node}" in text, text[:2000]
    assert f"system/{node}/cpu_utilization_percentage" in text, text[:2000]  # a drawn chart's legend
    assert f"system/{node}/system_memory_usage_megabytes" in text, text[:2000]
    b.screenshot("pretrain_system_metrics")

    # 3. The final weights as a logged model: listed in the experiment's models, on the run, with eval metrics.
    models = client.search_logged_models([exp.experiment_id])
    assert len(models) == 4 and {m.source_run_id for m in models} == {r.info.run_id for r in pretrain}
    model = next(m for m in models if m.source_run_id == run.info.run_id)
    text = b.open(f"{base}/models?{ML}", model.name)
    assert text.count(model.name) >= 4, text[:2000]  # the four variants' models
    text = b.open(f"{base}/models/{model.model_id}?{ML}", "zeroshot_top1", "i2t_R1")
    assert "zeroshot_top1" in text and "i2t_R1" in text and "eval" in text, text[:2000]
    b.screenshot("logged_model")
    # ... loadable with the project's own loader (its recipe.json builds the model)
    import mlflow

    from filipctl.schema import Recipe
    from jobs.eval.weights import load_model

    mlflow.set_tracking_uri(reviewed["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                     dst_path=str(reviewed["folder"] / "model")))
    recipe = Recipe.model_validate(json.loads((local / "recipe.json").read_text()))
    assert load_model(recipe, local / "model.pt") is not None

    # 4. The ablation's variants, grouped by their setting tag: two groups of two seeds, in the table and charts.
    for r in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
        assert r.data.tags["filipctl.setting"] in ("baseline", "+late_interaction"), r.data.tags
        assert r.data.tags["filipctl.seed"] in ("0", "1"), r.data.tags
    # "Group by" a tag, as a person picks it in the table's menu: the UI keeps that choice in localStorage.
    key = json.dumps(f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([exp.experiment_id])}-ReactComponentState")
    state = json.loads(b.js(f"localStorage.getItem({key})") or "{}")
    state["groupBy"] = {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": "filipctl.setting"}]}
    b.js(f"localStorage.setItem({key}, {json.dumps(json.dumps(state))})")
    text = b.open(f"{base}?{ML}", "Group: baseline", "Group: +late_interaction")
    assert "Group by: filipctl.setting" in text, text[:2000]
    assert "Group: baseline" in text and "Group: +late_interaction" in text, text[:2000]
    for seed in (0, 1):  # each group holds both seeds' variant runs
        assert f"baseline@seed{seed}" in text and f"+late_interaction@seed{seed}" in text, text[:3000]
    assert text.index("Group: +late_interaction") < text.index("+late_interaction@seed1") < text.index("Group: baseline")
    b.screenshot("ablation_grouped")
    text = b.open(f"{base}/runs/{parent.info.run_id}?{ML}", "late_interaction", "baseline")
    assert "ablation of late_interaction" in text and "+late_interaction" in text, text[:2000]
    b.screenshot("ablation_parent")
