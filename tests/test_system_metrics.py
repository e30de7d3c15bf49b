"""System metrics (jobs/system_metrics.py): each node's CPU, memory, disk and network under MLflow's own names, sampled
into the stage folder by the job and forwarded like every metric: a real training and eval run shows them on its
stage runs with a node id, and a store that is down delays them without ending the sampling."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from filipctl.contract import ENV_SPOOL, TAG_PARENT, RunDir, free_port, node_spool
from filipctl.tracking.forwarder import stage_spools, write_stage_run
from jobs.system_metrics import Probes, Sampler, cpu_percent, keys, last_step, node_id, system_metrics

HOST_METRICS = {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
                "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes",
                "network_receive_megabytes", "network_transmit_megabytes"}


def test_the_names_are_mlflows_own() -> None:
    """What MLflow's SystemMetricsMonitor logs on a machine without GPUs, and how it prefixes a node id."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor("run", node_id="n1", tracking_uri="sqlite:///:memory:")
    monitor.collect_metrics()
    theirs = set(monitor.aggregate_metrics())
    ours = set(Probes(Path("/"), print).read())
    assert ours == theirs == HOST_METRICS
    recorded: dict[str, float] = {}
    monitor.mlflow_logger.record_metrics = lambda metrics, step: recorded.update(metrics)  # what it would send
    monitor.publish_metrics({"cpu_utilization_percentage": 1.0})
    assert set(recorded) == set(keys("n1", {"cpu_utilization_percentage": 1.0})) == \
        {"system/n1/cpu_utilization_percentage"}


def test_gpu_names_are_mlflows_own_where_pynvml_finds_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU needed: a stand-in for pynvml (NVML's answers for two GPUs), read by MLflow's GPU monitor and by ours."""
    import types

    import mlflow.system_metrics.metrics.gpu_monitor as theirs

    nvml = types.SimpleNamespace(
        NVMLError=RuntimeError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 10**9, total=80 * 10**9),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50 + h),
        nvmlDeviceGetPowerUsage=lambda h: 350_000, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(theirs, "pynvml", nvml, raising=False)
    monitor = theirs.GPUMonitor()
    monitor.collect_metrics()
    expected = monitor.aggregate_metrics()
    ours = Probes(Path("/"), print).read()
    assert {k: v for k, v in ours.items() if k.startswith("gpu_")} == expected
    assert ours["gpu_1_memory_usage_megabytes"] == 2000.0 and ours["gpu_0_power_usage_percentage"] == 50.0


def test_node_id_and_cpu_share() -> None:
    assert node_id({}, "gpu-17.cluster.example.org") == "gpu-17"
    assert node_id({"SLURMD_NODENAME": "filip-n2"}, "host") == "filip-n2"
    assert node_id({"MLFLOW_SYSTEM_METRICS_NODE_ID": "node 0", "SLURMD_NODENAME": "x"}, "host") == "node_0"
    assert node_id({}, "") == "node"
    t = psutil._psplatform.scputimes  # the platform's cpu_times() tuple
    zero = dict.fromkeys(t._fields, 0.0)
    before = t(**zero)
    after = t(**{**zero, "user": 3.0, "system": 1.0, "idle": 3.0, "iowait": 1.0})
    assert cpu_percent(before, after) == 50.0  # iowait is idle time
    assert cpu_percent(after, after) == 0.0


def test_the_sampler_goes_on_after_a_failed_reading_and_a_resumed_job_continues_the_steps(tmp_path: Path) -> None:
    spool = tmp_path / "system-n1.jsonl"
    readings = iter([{"cpu_utilization_percentage": 10.0}, OSError("no /proc"), {"cpu_utilization_percentage": 30.0}])

    def read() -> dict[str, float]:
        value = next(readings)
        if isinstance(value, Exception):
            raise value
        return value

    said: list[str] = []
    sampler = Sampler(spool, "n1", 3600, read, said.append)
    for _ in range(3):
        sampler.sample()
    assert sampler.samples == 2 and len(said) == 1 and "no /proc" in said[0]
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert [(r["step"], r["values"]) for r in records] == [
        (0, {"system/n1/cpu_utilization_percentage": 10.0}), (1, {"system/n1/cpu_utilization_percentage": 30.0})]
    with open(spool, "a") as f:
        f.write('{"t": 1, "op": "metrics", "step": 99')  # a torn last line (a crash mid-write) is not a step
    assert last_step(spool) == 1
    assert Sampler(spool, "n1", 3600, read, said.append).step == 2  # the next attempt's first sample
    assert last_step(tmp_path / "none.jsonl") == -1


def test_sampling_goes_on_while_the_store_is_down_and_the_backlog_arrives_after(tmp_path: Path, monkeypatch) -> None:
    """A store that does not answer: the node's spool grows; once it answers, `filipctl status`/`sync`'s backlog
    sends every sample to the stage's run, with its step and the time it was taken."""
    from mlflow.tracking import MlflowClient

    from filipctl.orchestration.tracking_backlog import backlog, behind
    from filipctl.tracking.forwarder import drain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    stage = RunDir(tmp_path / "stage")
    write_stage_run(stage, uri, run)
    monkeypatch.setenv(ENV_SPOOL, str(stage.spool))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_NODE_ID", "n1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with system_metrics(0.1, stage.root) as sampler:
        assert sampler is not None
        waiting = []
        for _ in range(4):
            time.sleep(0.35)
            assert drain(stage_spools(stage, uri), down, timeout_s=0) > 0  # not taken
            waiting.append(behind(str(stage.root), uri))
    assert waiting == sorted(waiting) and waiting[-1] > waiting[0] >= 1, waiting  # it kept sampling
    taken = [json.loads(line) for line in node_spool(stage.spool, "n1").read_text().splitlines()]
    assert len(taken) == sampler.samples == behind(str(stage.root), uri) >= 4  # every 0.1 s for 1.4 s

    waits = backlog(uri, [str(stage.root)])  # what `filipctl sync` sends
    assert waits.pending == len(taken)
    assert waits.send(uri, timeout_s=30) == 0  # the store is back
    assert behind(str(stage.root), uri) == 0
    history = client.get_metric_history(run, "system/n1/cpu_utilization_percentage")
    assert [(m.step, m.timestamp) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], r["t"]) for r in taken]
    assert {k.split("/", 2)[2] for k in client.get_run(run).data.metrics} == HOST_METRICS


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # with tests/test_cli.py, which shares conftest.local_run
def test_a_real_run_shows_each_jobs_system_metrics_on_its_stage_run(local_run: dict) -> None:
    """The session's local run (2-worker pretraining, then eval; default interval): one node, one sampler per job,
    every sample in the store under system/<node>/..., timed while the job ran."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(local_run["uri"])
    exp = client.get_experiment_by_name("filip")
    # That run's stages (tests/test_cli.py adds other runs to the same store, before or after this test).
    parent = client.get_run(local_run["pretrain_run"]).data.tags[TAG_PARENT]
    for stage in ("pretrain", "eval"):
        (run,) = client.search_runs([exp.experiment_id],
                                    f"tags.`filipctl.stage` = '{stage}' and tags.`{TAG_PARENT}` = '{parent}'")
        system = {k for k in run.data.metrics if k.startswith("system/")}
        (node,) = {k.split("/")[1] for k in system}
        assert system == {f"system/{node}/{m}" for m in HOST_METRICS}, system
        key = f"system/{node}/cpu_utilization_percentage"
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(len(history))) and len(history) >= 1  # one sampler per node
        assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in history)
        assert all(0.0 <= m.value <= 100.0 for m in history)
        memory = client.get_metric_history(run.info.run_id, f"system/{node}/system_memory_usage_megabytes")
        assert len(memory) == len(history) and all(m.value > 0 for m in memory)
