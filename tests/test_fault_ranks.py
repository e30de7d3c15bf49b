"""Faults of ranks (issue 20, items 5 and 6), with the real CLI, real torchrun groups and real signals:

- a stopped (hung) rank: the collective timeout (train.collective_timeout_s) fails the job soon after, and the
  terminal names the rank that stopped;
- a killed rank on the local backend: torchrun restarts the group (train.max_restarts), it resumes from the last
  checkpoint, the run finishes, and the restart is recorded;
- a worker failing with an exception that is not the job's own error: the terminal shows its type and message
  (the worker's error record), not torchrun's ChildFailedError box.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.conftest import FILIPCTL, ROOT, run_cli

SMOKE = str(ROOT / "recipes/smoke.yaml")
NO_EVAL = ["--set", "eval.enabled=false"]


def _sets(**values: object) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k.replace('__', '.')}={v}")]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*FILIPCTL, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for(what: str, check: Callable[[], object], timeout: float, proc: subprocess.Popen) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the CLI ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def _pretrain_folder(tmp_path: Path) -> Path | None:
    found = list((tmp_path / "runs" / "stages").glob("pretrain-*"))
    return found[0] if found else None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _workers(folder: Path) -> dict[int, int]:
    """rank -> pid of the torchrun group the job record names (its children, by their RANK variable)."""
    try:
        torchrun = json.loads((folder / "logs" / "pretrain.job.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return {}
    ranks = {}
    for pid in _children(torchrun):
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def _beat(folder: Path, rank: int) -> int:
    """The last step a rank's heartbeat says it completed (-1: none yet)."""
    try:
        return int((folder / "logs" / "heartbeat" / f"rank{rank}").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def _kill_group(proc: subprocess.Popen, pids: list[int]) -> None:
    """Whatever is left of a test's processes: continued (a stopped one ignores all else) and killed."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_stopped_rank_fails_the_job_within_the_timeout_naming_it(tmp_path: Path, smoke_overrides: list[str]) -> None:
    timeout_s = 15
    args = ["run", SMOKE, *smoke_overrides, *NO_EVAL,
            *_sets(train__steps=200, train__collective_timeout_s=timeout_s, train__max_restarts=0)]
    t0 = time.time()
    proc = _start(args, tmp_path)
    stopped: list[int] = []
    try:
        folder = _wait_for("pretrain folder", lambda: _pretrain_folder(tmp_path), 300, proc)
        _wait_for("rank 1 at step 3", lambda: _beat(folder, 1) >= 3, 300, proc)
        pid = _workers(folder)[1]
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        t_stop, step = time.time(), _beat(folder, 1)
        out, err = proc.communicate(timeout=timeout_s * 3 + 120)
        took = time.time() - t_stop
    finally:
        _kill_group(proc, stopped)
    print(f"rank 1 stopped after step {step}; the CLI failed {took:.0f} s later (timeout {timeout_s} s); "
          f"test {time.time() - t0:.0f} s")
    assert proc.returncode == 1, out + err
    # The timeout, the heartbeat wait (3 s) and torchrun's teardown (30 s for a stopped process, which only SIGKILL
    # ends), not DeepSpeed's 10 minutes.
    assert took < timeout_s + 3 + 30 + 20, (took, err)
    assert f"Cause: rank 0: a collective timed out after {timeout_s} s (train.collective_timeout_s) waiting for " \
           f"rank 1 (stopped after step {step}, no progress for " in err, err
    assert "ChildFailedError" not in err and "Traceback" not in err, err


def test_a_killed_rank_restarts_the_group_from_the_last_checkpoint(tmp_path: Path,
                                                                   smoke_overrides: list[str]) -> None:
    args = ["run", SMOKE, *smoke_overrides, *NO_EVAL,
            *_sets(train__steps=12, train__checkpoint_every=3, train__micro_batch_size=16, train__max_restarts=1)]
    t0 = time.time()
    proc = _start(args, tmp_path)
    killed: list[int] = []
    try:
        folder = _wait_for("pretrain folder", lambda: _pretrain_folder(tmp_path), 300, proc)
        latest = folder / "checkpoints" / "latest"
        _wait_for("the first checkpoint", latest.is_file, 300, proc)
        tag = latest.read_text().strip()
        pid = _workers(folder)[1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        out, err = proc.communicate(timeout=600)
    finally:
        _kill_group(proc, killed)
    print(f"rank 1 killed after {tag}; test {time.time() - t0:.0f} s")
    assert proc.returncode == 0, out + err
    resumed_at = int(tag.removeprefix("step"))
    said = f"restart 1 of 1: resuming from step {resumed_at}"
    log = (folder / "logs" / "pretrain.log").read_text()
    assert said in log, log[-3000:]
    events = [json.loads(line) for line in (folder / "logs" / "pretrain.events.jsonl").read_text().splitlines()]
    assert any(e["message"] == said and e.get("restart") == 1 for e in events), events
    # The second group trained only what the checkpoint did not hold, and finished.
    result = json.loads((folder / "result.json").read_text())
    assert result["metrics"]["steps_run"] == 12 - resumed_at, result
    assert (folder / "model.pt").is_file()
    # ... and the stage's MLflow run says so.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run"])
    assert run.data.tags.get("filipctl.restarts") == "1", run.data.tags
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "restarts")] == [(resumed_at, 1.0)]


def test_a_worker_exception_reaches_the_terminal_not_the_launcher_box(tmp_path: Path,
                                                                       smoke_overrides: list[str]) -> None:
    # Shards the index believes (their img2dataset stats say 50 samples each) but that hold no readable sample:
    # the loader raises a RuntimeError inside both workers at their first batch, not a JobError.
    shards = tmp_path / "garbage"
    shards.mkdir()
    for i in range(2):
        (shards / f"{i:05d}.tar").write_bytes(os.urandom(8192))
        (shards / f"{i:05d}_stats.json").write_text(json.dumps({"count": 50, "successes": 50}))
    t0 = time.time()
    res = run_cli("run", SMOKE, *smoke_overrides, *NO_EVAL,
                  *_sets(data__synthetic="null", data__train=shards, data__eval="null", train__max_restarts=0),
                  cwd=tmp_path, timeout=600)
    print(f"test {time.time() - t0:.0f} s")
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr
    assert "stage pretrain failed" in err, err
    assert "RuntimeError: source " in err and "found no readable sample in a whole epoch" in err, err
    assert "ChildFailedError" not in err and "FAILED" not in err, err
    folder = _pretrain_folder(tmp_path)
    assert folder is not None and str(folder / "logs" / "pretrain.log") in err, err  # where its traceback is
    records = list((folder / "logs" / "errors").glob("rank*.json"))
    assert records and all("Traceback" in json.loads(p.read_text())["traceback"] for p in records), records


# -- the pieces, without processes ---------------------------------------------------------------------------------

def test_the_heartbeat_names_the_rank_that_did_not_reach_the_collective(tmp_path: Path) -> None:
    from jobs.train.heartbeat import Heartbeat, who_stopped

    beats = {r: Heartbeat(tmp_path, r) for r in range(4)}
    for r in range(4):
        beats[r].beat(12)
    beats[3].beat(13)
    # Ranks 0 and 3 waited in the collective (3 marks it itself); 1 and 2 did not come: 1 stopped a step earlier.
    beats[3].beat(13, waiting=True)
    beats[1].beat(11)
    said = who_stopped(beats[0], 4, wait_s=0.0)
    assert said.startswith("rank 1 (stopped after step 11, no progress for "), said
    assert ", rank 2 (stopped after step 12, no progress for " in said, said
    assert "rank 3" not in said
    # A rank whose file is an earlier attempt's never reached its first step in this one.
    again = Heartbeat(tmp_path, 0)
    again.started += 60
    assert "rank 1 (never reached its first step)" in who_stopped(again, 2, wait_s=0.0)


def test_a_heartbeat_costs_microseconds(tmp_path: Path) -> None:
    from jobs.train.heartbeat import Heartbeat

    beat = Heartbeat(tmp_path, 0)
    t0 = time.perf_counter()
    for step in range(10_000):
        beat.beat(step)
    per_beat = (time.perf_counter() - t0) / 10_000
    print(f"one heartbeat: {per_beat * 1e6:.1f} us")
    assert per_beat < 200e-6  # against a step of 0.1-1 s here


def test_the_first_error_of_the_last_attempt_is_the_one_shown(tmp_path: Path, monkeypatch) -> None:
    from filipctl.contract import RunDir, JobError, clear_error_records, describe_error, exit_status, first_error

    run_dir = RunDir(tmp_path)
    data = tmp_path / "data.bin"
    data.write_bytes(b"")

    def fails(exc: Exception) -> Callable[[], None]:
        def body() -> None:
            raise exc
        return body

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("RANK", "1")
    assert exit_status(fails(JobError("the first attempt's")), run_dir) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    try:
        exit_status(fails(ValueError(f"cannot parse {data}: bad header")), run_dir)
    except ValueError:
        pass  # not a JobError: it still propagates (its traceback goes to the log)
    else:
        raise AssertionError("the exception did not propagate")
    monkeypatch.setenv("RANK", "0")
    assert exit_status(fails(JobError("waited for rank 1")), run_dir) == 1
    first = first_error(run_dir)
    assert describe_error(first) == f"rank 1: ValueError: cannot parse {data}: bad header", first
    assert first["file"] == str(data) and "Traceback" in first["traceback"]
    clear_error_records(run_dir)
    assert first_error(run_dir) is None


def test_a_restart_does_not_repeat_the_users_error_but_retries_a_stopped_rank(tmp_path: Path, monkeypatch) -> None:
    import pytest

    from filipctl.contract import JobError, RunDir, write_error_record
    from jobs.train.distributed import RankStopped
    from jobs.train.pretrain import refuse_pointless_restart

    run_dir = RunDir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    write_error_record(run_dir, RankStopped("a collective timed out after 5 s waiting for rank 1"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    refuse_pointless_restart(run_dir)  # a stopped rank: the restarted group trains
    write_error_record(run_dir, JobError("loss is nan at step 5: lower optim.base_lr"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    with pytest.raises(JobError, match="loss is nan at step 5"):  # the user's error: at once, without training
        refuse_pointless_restart(run_dir)
