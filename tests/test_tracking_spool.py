"""The tracking spool and its forwarding, against a real MLflow sqlite store (and a closed port for a store that is
down): records go in with their steps and times, in order, once; what the store refuses for good is set aside;
what it cannot take now waits; a resumed stage continues its run."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from filipctl.contract import ENV_RUN_ID, ENV_SPOOL, RunDir, free_port
from filipctl.states import State
from filipctl.tracking.forwarder import drain, stage_run_of, stage_spool, write_stage_run
from filipctl.tracking.spool import Spool, StoreUnavailable
from jobs.stage_logger import StageLogger


@pytest.fixture
def store(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    return client, exp


def _logger(spool: Path, monkeypatch: pytest.MonkeyPatch, run_id: str = "r") -> StageLogger:
    monkeypatch.setenv(ENV_SPOOL, str(spool))
    monkeypatch.setenv(ENV_RUN_ID, run_id)
    return StageLogger(True)


def test_logged_metrics_arrive_with_their_steps_and_times_once(tmp_path: Path, store, monkeypatch) -> None:
    client, exp = store
    run = client.create_run(exp).info.run_id
    log = _logger(tmp_path / "spool.jsonl", monkeypatch, run)
    for step in range(1, 6):
        log.metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
    log.tags({"k": "v"})
    log.text("{}", "cfg/ds.json")
    log.sync()
    spool = Spool(tmp_path / "spool.jsonl", run)
    assert spool.pending() == 7
    logged_at = [json.loads(line)["t"] for line in spool.path.read_text().splitlines()[:5]]
    assert spool.send(client) == 7 and spool.pending() == 0
    assert spool.send(client) == 0  # nothing twice
    history = client.get_metric_history(run, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(s, 1.0 / s, t) for s, t in zip(range(1, 6), logged_at)]
    assert client.get_run(run).data.tags["k"] == "v"
    assert [a.path for a in client.list_artifacts(run, "cfg")] == ["cfg/ds.json"]


def test_a_half_written_last_line_waits_and_a_garbled_one_is_set_aside(tmp_path: Path, store) -> None:
    client, exp = store
    run = client.create_run(exp).info.run_id
    path = tmp_path / "spool.jsonl"
    good = json.dumps({"t": 1000, "op": "metrics", "step": 1, "values": {"loss": 2.0}})
    path.write_text(good + "\n" + "{not json\n" + good.replace('"step": 1', '"step": 2')[:20])
    spool = Spool(path, run)
    assert spool.send(client) == 1  # the garbled line is dropped, the unfinished one waits for its newline
    assert "not a JSON record" in spool.dropped_file.read_text()
    with open(path, "a") as f:
        f.write(good.replace('"step": 1', '"step": 2')[20:] + "\n")
    assert spool.send(client) == 1
    assert sorted(m.step for m in client.get_metric_history(run, "loss")) == [1, 2]


def test_a_garbled_line_never_carries_the_records_before_it_past_a_failed_send(tmp_path: Path, store,
                                                                               monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    client, exp = store
    run = client.create_run(exp).info.run_id
    path = tmp_path / "spool.jsonl"
    line = lambda step: json.dumps({"t": 1000 + step, "op": "metrics", "step": step, "values": {"loss": 1.0}})  # noqa: E731
    path.write_text(line(1) + "\n" + line(2) + "\n" + "{torn\n" + line(3) + "\n")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spool = Spool(path, run)
    with pytest.raises(StoreUnavailable):
        spool.send(MlflowClient(f"http://127.0.0.1:{free_port()}"))
    assert spool.pending() == 4  # nothing counted as sent: steps 1 and 2 did not go in
    assert spool.send(client) == 3
    assert sorted(m.step for m in client.get_metric_history(run, "loss")) == [1, 2, 3]


def test_one_refused_metric_does_not_cost_the_others_of_its_batch(tmp_path: Path, store, monkeypatch) -> None:
    client, exp = store
    run = client.create_run(exp).info.run_id
    log = _logger(tmp_path / "spool.jsonl", monkeypatch, run)
    for step in range(1, 6):
        log.metrics({"loss": 1.0 / step}, step=step)
    log.metrics({"acc@1 (zero-shot)": 0.5}, step=5)  # a name MLflow refuses
    spool = Spool(tmp_path / "spool.jsonl", run)
    assert spool.send(client) == 6 and spool.pending() == 0
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1, 2, 3, 4, 5]
    (dropped,) = [json.loads(line) for line in spool.dropped_file.read_text().splitlines()]
    assert "acc@1 (zero-shot)" in dropped["record"]["values"]


def test_a_resumed_job_finds_the_last_step_an_earlier_attempt_logged(tmp_path: Path, monkeypatch) -> None:
    log = _logger(tmp_path / "spool.jsonl", monkeypatch)
    assert log.last_step("loss") == 0
    for step in (2, 4, 6):
        log.metrics({"loss": 1.0, "lr": 0.1}, step=step)
    log.metrics({"lr": 0.1}, step=8)  # another metric's later step does not count
    with open(tmp_path / "spool.jsonl", "a") as f:
        f.write('{"op": "metrics", "step": 99, "values": {"loss"')  # a torn last line does not either
    assert _logger(tmp_path / "spool.jsonl", monkeypatch).last_step("loss") == 6


def test_each_store_has_its_own_outboxes(tmp_path: Path, monkeypatch) -> None:
    from filipctl.tracking.writer import outbox_folder

    monkeypatch.chdir(tmp_path)  # a server's index (and outboxes) live in the working folder, as a sqlite store here
    assert outbox_folder("http://a:5000") != outbox_folder("http://b:5000") != outbox_folder(f"sqlite:///{tmp_path}/x.db")
    assert outbox_folder("http://a:5000").parent == outbox_folder(f"sqlite:///{tmp_path}/x.db").parent


def test_big_batches_are_split_to_mlflows_limits(tmp_path: Path, store, monkeypatch) -> None:
    client, exp = store
    run = client.create_run(exp).info.run_id
    log = _logger(tmp_path / "spool.jsonl", monkeypatch, run)
    log.metrics({f"m{i}": float(i) for i in range(2500)}, step=3)
    log.tags({f"t{i}": str(i) for i in range(250)})
    spool = Spool(tmp_path / "spool.jsonl", run)
    assert spool.send(client) == 2
    data = client.get_run(run).data
    assert len(data.metrics) == 2500 and sum(k.startswith("t") for k in data.tags) == 250


def test_a_refused_record_is_set_aside_and_the_rest_goes_on(tmp_path: Path, store, monkeypatch) -> None:
    client, exp = store
    gone, kept = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.delete_run(gone)
    path = tmp_path / "outbox.jsonl"
    from filipctl.tracking.spool import append

    append(path, {"op": "metrics", "run": gone, "step": 0, "values": {"x": 1.0}})
    append(path, {"op": "artifact", "run": kept, "path": str(tmp_path / "no-such-file"), "artifact_path": None})
    append(path, {"op": "status", "run": kept, "status": "FINISHED", "end": 5000})
    spool = Spool(path)
    assert spool.send(client) == 3 and spool.pending() == 0
    dropped = [json.loads(line) for line in spool.dropped_file.read_text().splitlines()]
    assert [d["record"]["run"] for d in dropped] == [gone, kept]
    assert client.get_run(kept).info.status == "FINISHED" and client.get_run(kept).info.end_time == 5000


def test_a_store_that_does_not_answer_keeps_everything_for_later(tmp_path: Path, store, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    client, exp = store
    run = client.create_run(exp).info.run_id
    log = _logger(tmp_path / "spool.jsonl", monkeypatch, run)
    log.metrics({"loss": 1.0}, step=1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    spool = Spool(tmp_path / "spool.jsonl", run)
    with pytest.raises(StoreUnavailable):
        spool.send(down)
    assert spool.pending() == 1
    assert drain([spool], down, timeout_s=0) == 1
    assert drain([spool], client, timeout_s=5) == 0
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1]


def test_one_sender_at_a_time(tmp_path: Path, store, monkeypatch) -> None:
    client, exp = store
    run = client.create_run(exp).info.run_id
    _logger(tmp_path / "spool.jsonl", monkeypatch, run).metrics({"loss": 1.0}, step=1)
    spool = Spool(tmp_path / "spool.jsonl", run)
    with open(tmp_path / "spool.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is sending this spool
        assert spool.send(client) == 0 and spool.pending() == 1
    assert spool.send(client) == 1


def test_a_spool_sent_to_a_new_run_sends_it_everything(tmp_path: Path, store, monkeypatch) -> None:
    """Another store (or a run that could not be continued): the new run gets the whole history, not the rest."""
    client, exp = store
    first, second = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    run_dir = RunDir(tmp_path / "stage")
    log = _logger(run_dir.spool, monkeypatch)
    log.metrics({"loss": 1.0}, step=1)
    write_stage_run(run_dir, "uri-a", first)
    assert stage_spool(run_dir, "uri-a").send(client) == 1
    log.metrics({"loss": 0.5}, step=2)
    write_stage_run(run_dir, "uri-a", second)
    assert stage_run_of(run_dir, "uri-a") == second and stage_run_of(run_dir, "uri-b") == ""
    assert stage_spool(run_dir, "uri-a").send(client) == 2
    assert [m.step for m in client.get_metric_history(second, "loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(first, "loss")] == [1]


def test_a_resumed_stage_continues_its_run_and_records_the_resume(tmp_path: Path) -> None:
    from filipctl.tracking.writer import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "filip")
    first_parent = tracker.start_run("p1", "pipeline", "smoke", "local", {})
    stage = tracker.start_stage(first_parent, "pretrain", "smoke", "local", "final_loss", folder="f", stage_key="k")
    tracker.set_state(stage, State.FAILED)
    second_parent = tracker.start_run("p2", "pipeline", "smoke", "local", {})
    assert tracker.continue_stage(stage, second_parent, "pretrain", "final_loss", "f", "k")
    assert tracker.flush(10) == 0
    run = tracker.client.get_run(stage)
    assert run.data.tags["mlflow.parentRunId"] == second_parent
    assert run.data.tags["filipctl.resumes"] == "1" and run.data.tags["filipctl.resume.1"].startswith(second_parent)
    assert run.info.status == "SCHEDULED"
    assert [s["run_id"] for s in tracker.state.stages(second_parent)] == [stage]
    # The pipeline it left, whose command died before recording its end, ends now.
    assert tracker.state.run_state(first_parent) is State.FAILED
    assert tracker.client.get_run(first_parent).info.status == "FAILED"
    other = Tracker(uri, "another-experiment")
    assert not other.continue_stage(stage, second_parent, "pretrain", "final_loss", "f", "k")
    assert not tracker.continue_stage("0" * 32, second_parent, "pretrain", "final_loss", "f", "k")


