"""The control plane end to end without training: real stage graphs, real stage folders, a real state index,
the executor and the runner, driven by the in-process TEST backend (tests/inprocess_backend.py).

These replace the end-to-end runs that existed only to check orchestration (caching, sharing between
ablation variants, skip after a failure, Ctrl-C and resume, cancel, detach and status); the real
backends keep their real tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filipctl.contract import ENV_RUN_ID
from filipctl.errors import FilipctlError
from filipctl.orchestration import ablation, stage_folders
from filipctl.orchestration import status as st
from filipctl.orchestration.executor import Executor, Limits, Step
from filipctl.orchestration.graph import Graph, build_graph
from filipctl.orchestration.runner import Runner, Transition
from filipctl.orchestration.state_index import StateStore
from filipctl.recipes import load_recipe
from filipctl.states import State
from tests.conftest import ROOT
from tests.inprocess_backend import InProcessTestBackend


def smoke(tmp_path: Path, *sets: str):
    return load_recipe(ROOT / "recipes/smoke.yaml", [f"output_dir={tmp_path / 'runs'}", *sets])


def variants(tmp_path: Path, components: list[str], seeds: list[int] = [0]):
    recipe = load_recipe(ROOT / "recipes/ablation.yaml", [f"output_dir={tmp_path / 'runs'}"])
    return ablation.variants(recipe, components, seeds)


class Seen:
    """A subscriber that keeps what it is told."""

    def __init__(self) -> None:
        self.t: list[Transition] = []

    def changed(self, t: Transition) -> None:
        self.t.append(t)

    def states(self, stage: str) -> list[str]:
        return [t.new.value for t in self.t if t.node.stage.name == stage]


def prepared(graph: Graph, backend: InProcessTestBackend, force: bool = False) -> Runner:
    """What GraphRun does before it runs, without MLflow: the executor over the done records, the folders of
    the stages to run."""
    steps = {k: Step(k, tuple(n.deps.values()), n.stage.processes) for k, n in graph.nodes.items()}
    ex = Executor(steps, stage_folders.done_records(graph), force=force,
                  native_dependencies=backend.native_dependencies, limits=Limits(*backend.capacity()))
    reused = ex.reusable()
    stage_folders.prepare(graph, [n for k, n in graph.nodes.items() if k not in reused], fresh=force)
    return Runner(graph, backend, ex, poll_s=0)


def run_graph(graph: Graph, backend: InProcessTestBackend, force: bool = False, detach: bool = False,
              seen: Seen | None = None) -> Runner:
    """What GraphRun does, without MLflow."""
    runner = prepared(graph, backend, force)
    if seen is not None:
        runner.subscribers.append(seen)
    runner.run(detach)
    return runner


def test_a_run_records_each_result_and_a_rerun_reuses_every_stage(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_RUN_ID, "run-of-the-job")  # as the job's environment names its MLflow run
    graph = build_graph({"": smoke(tmp_path)}, tmp_path / "runs")
    backend = InProcessTestBackend(metrics={"pretrain": {"final_loss": 1.5}, "eval": {"zeroshot_top1": 0.5}})
    seen = Seen()
    runner = run_graph(graph, backend, seen=seen)
    assert [n.stage.name for n in graph.nodes.values()] == ["data", "pretrain", "eval"]
    assert all(s is State.COMPLETED for s in runner.executor.state.values())
    assert seen.states("pretrain") == ["QUEUED", "RUNNING", "COMPLETED"]
    pre, ev = (graph.nodes[graph.variants[""][s]] for s in ("pretrain", "eval"))
    # the result channel: metrics come from the job's result.json, into done.json and to the subscribers
    done = json.loads(pre.run_dir.done.read_text())
    assert done["metrics"] == {"final_loss": 1.5} and runner.metrics[ev.key] == {"zeroshot_top1": 0.5}
    assert done["mlflow_run"] == "run-of-the-job"  # where a later run that reuses it finds its loss curve
    assert json.loads(ev.run_dir.done.read_text())["inputs"] == {
        graph.variants[""]["data"]: json.loads(graph.nodes[graph.variants[""]["data"]].run_dir.done.read_text())["id"],
        pre.key: done["id"]}
    assert json.loads(ev.run_dir.inputs_file.read_text()) == {"data": str(graph.nodes[graph.variants[""]["data"]].run_dir.root),
                                                                "pretrain": str(pre.run_dir.root)}
    # the same graph again: nothing submitted, every stage cached with the metrics it had
    again, seen2 = InProcessTestBackend(), Seen()
    runner2 = run_graph(build_graph({"": smoke(tmp_path)}, tmp_path / "runs"), again, seen=seen2)
    assert again.submitted == [] and set(runner2.executor.state.values()) == {State.CACHED}
    assert runner2.metrics[pre.key] == {"final_loss": 1.5}
    # --fresh: everything again
    assert len(run_graph(graph, InProcessTestBackend(), force=True).backend.submitted) == 3


def test_a_change_to_what_pretraining_reads_reruns_it_and_its_eval_not_the_data(tmp_path: Path) -> None:
    run_graph(build_graph({"": smoke(tmp_path)}, tmp_path / "runs"), InProcessTestBackend())
    backend = InProcessTestBackend()
    graph = build_graph({"": smoke(tmp_path, "optim.base_lr=0.001")}, tmp_path / "runs")
    run_graph(graph, backend)
    assert [name.split("-")[0] for name in backend.submitted] == ["pretrain", "eval"]


def test_ablation_variants_share_the_data_stage_and_train_two_at_a_time(tmp_path: Path) -> None:
    graph = build_graph(variants(tmp_path, ["aug", "late_interaction"]), tmp_path / "runs")
    assert len(graph.nodes) == 9  # one data stage, then pretrain and eval of each of the 4 settings
    backend = InProcessTestBackend(max_stages=2, running_polls=3)
    runner = run_graph(graph, backend)
    assert set(runner.executor.state.values()) == {State.COMPLETED}
    assert [n.split("-")[0] for n in backend.submitted].count("data") == 1
    assert backend.running_at_once == 2
    # one component more: only +image_aug trains; all three together is +aug+late_interaction again (aug holds
    # image_aug), the same stages by content, reused
    more = build_graph(variants(tmp_path, ["aug", "late_interaction", "image_aug"]), tmp_path / "runs")
    backend2 = InProcessTestBackend(max_stages=2)
    runner2 = run_graph(more, backend2)
    assert sorted(n.split("-")[0] for n in backend2.submitted) == ["eval", "pretrain"]
    assert more.variants["+aug+late_interaction+image_aug"] == graph.variants["+aug+late_interaction"]
    assert sum(s is State.CACHED for s in runner2.executor.state.values()) == 9


def test_on_two_cores_two_process_stages_run_one_at_a_time(tmp_path: Path) -> None:
    backend = InProcessTestBackend(max_processes=2, running_polls=3)
    run_graph(build_graph(variants(tmp_path, ["aug"]), tmp_path / "runs"), backend)
    assert backend.running_at_once == 1


def test_a_failed_stage_skips_what_reads_from_it_and_the_other_variants_finish(tmp_path: Path) -> None:
    graph = build_graph(variants(tmp_path, ["aug"]), tmp_path / "runs")
    failing = next(n for n in graph.nodes.values() if n.stage.name == "pretrain" and n.variants == ["+aug"])
    backend = InProcessTestBackend(max_stages=2)
    backend.outcomes = {}  # fail only the +aug pretraining: by folder
    original = backend._advance

    def advance(job):
        if job.request.run_dir.root == failing.run_dir.root:
            job.outcome = State.FAILED
        return original(job)

    backend._advance = advance  # type: ignore[method-assign]
    runner = run_graph(graph, backend)
    by_variant = {v: {s: runner.executor.state[k] for s, k in keys.items()} for v, keys in graph.variants.items()}
    assert by_variant["+aug"] == {"data": State.COMPLETED, "pretrain": State.FAILED, "eval": State.SKIPPED}
    assert set(by_variant["baseline"].values()) == {State.COMPLETED}
    assert not failing.run_dir.done.exists()


def test_exit_zero_without_a_result_is_a_failure_that_says_so(tmp_path: Path) -> None:
    graph = build_graph({"": smoke(tmp_path)}, tmp_path / "runs")
    runner = run_graph(graph, InProcessTestBackend(write_result=False))
    data = graph.variants[""]["data"]
    assert runner.executor.state[data] is State.FAILED
    assert "exited without writing" in runner.why[data] and "result.json" in runner.why[data]


def test_ctrl_c_cancels_the_running_job_and_the_rerun_resumes_after_what_finished(tmp_path: Path) -> None:
    graph = build_graph({"": smoke(tmp_path)}, tmp_path / "runs")
    backend = InProcessTestBackend(running_polls=5)
    pretrain = graph.variants[""]["pretrain"]
    runner = prepared(graph, backend)

    def ctrl_c() -> None:
        if runner.executor.state[pretrain] is State.RUNNING:
            raise KeyboardInterrupt

    runner.ticks.append(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    job = next(j for j in backend.jobs.values() if j.request.stage.name == "pretrain")
    assert job.cancelled and runner.executor.state[pretrain] is State.CANCELLED
    assert runner.executor.state[graph.variants[""]["eval"]] is State.SKIPPED
    again = InProcessTestBackend()
    rerun = run_graph(build_graph({"": smoke(tmp_path)}, tmp_path / "runs"), again)
    assert [n.split("-")[0] for n in again.submitted] == ["pretrain", "eval"]
    assert rerun.executor.state[graph.variants[""]["data"]] is State.CACHED


def test_a_refused_submission_cancels_what_was_queued_and_says_why(tmp_path: Path) -> None:
    graph = build_graph({"": smoke(tmp_path)}, tmp_path / "runs")
    backend = InProcessTestBackend(native=True, refuse={"eval"})
    with pytest.raises(FilipctlError, match="refused the eval job"):
        run_graph(graph, backend)
    assert all(j.cancelled for j in backend.jobs.values()) and len(backend.jobs) == 2


class RecordingTracker:
    """A TEST DOUBLE of tracking.writer.Tracker: the state index half of it (MLflow is left out)."""

    def __init__(self, store: StateStore) -> None:
        self.state = store
        self.metrics: dict[str, dict[str, float]] = {}

    def set_state(self, run_id: str, state: State) -> None:
        self.state.set_state(run_id, state)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics[run_id] = metrics
        self.state.set_metrics(run_id, metrics)


def test_a_detached_graph_is_followed_up_by_status(tmp_path: Path) -> None:
    graph = build_graph({"": smoke(tmp_path)}, tmp_path / "runs")
    backend = InProcessTestBackend(native=True, queued_polls=1, metrics={"pretrain": {"final_loss": 2.0}})
    runner = run_graph(graph, backend, detach=True)
    # everything queued at once, each job held for the one it reads from
    names = [n.split("-")[0] for n in backend.submitted]
    assert names == ["data", "pretrain", "eval"]
    assert [a[0].split("-")[0] for a in list(backend.after.values())[1:]] == ["pretrain", "pretrain"] or \
        backend.after[backend.submitted[1]] == (backend.submitted[0],)
    # what the MLflow sink records of a detached run, in the state index
    store = StateStore(tmp_path / "filipctl-state.db")
    store.add_run("p", "filip", "pipeline", "smoke-1", "smoke", backend.name)
    for i, (stage, key) in enumerate(graph.variants[""].items()):
        node = graph.nodes[key]
        store.add_stage(f"s{i}", "p", stage, node.stage.key_metric, folder=str(node.run_dir.root), stage_key=key)
        store.set_stage(f"s{i}", job_id=runner.handles[key].ref)
        store.set_state(f"s{i}", State.QUEUED)
    tracker = RecordingTracker(store)

    def status() -> list[dict]:
        rows = st.rows_from_index(store, "filip", 10)
        st.ask_schedulers(rows, backend_for=lambda name: backend)
        st.record(st.corrections(rows), tracker)
        return rows

    first = status()[0]
    assert [s["state"] for s in first["stages"]] == ["QUEUED"] * 3 and first["state"] == "RUNNING"
    assert [s["state"] for s in status()[0]["stages"]] == ["RUNNING", "QUEUED", "QUEUED"]
    for _ in range(6):
        rows = status()
    row = rows[0]
    assert [s["state"] for s in row["stages"]] == ["COMPLETED"] * 3 and row["state"] == "COMPLETED"
    assert row["stages"][1]["value"] == 2.0  # the key metric, from the result.json the job wrote
    assert row["stages"][1]["duration_s"] is not None  # counted from when it was seen running
    # status wrote the done records: the same command again reuses every stage
    again = InProcessTestBackend(native=True)
    assert set(run_graph(build_graph({"": smoke(tmp_path)}, tmp_path / "runs"), again).executor.state.values()) == \
        {State.CACHED} and again.submitted == []


def test_status_records_a_cancelled_or_failed_job_and_ends_the_ablation(tmp_path: Path) -> None:
    def stage(state: str, scheduler: str) -> dict:
        return {"stage": "pretrain", "run_id": "s", "state": state, "scheduler": scheduler, "key_metric": "x"}

    rows = [{"run_id": "a", "state": "RUNNING", "variants": [
        {"run_id": "v1", "state": "RUNNING", "stages": [stage("COMPLETED", ""), stage("RUNNING", "FAILED")]},
        {"run_id": "v2", "state": "RUNNING", "stages": [stage("QUEUED", "CANCELLED")]}]}]
    fixes = [(r["run_id"], s.value) for r, s in st.corrections(rows)]
    assert fixes == [("s", "FAILED"), ("v1", "FAILED"), ("s", "CANCELLED"), ("v2", "CANCELLED"), ("a", "FAILED")]
    # the scheduler not answering (or saying what is already recorded) changes nothing
    quiet = [{"run_id": "p", "state": "RUNNING", "stages": [stage("RUNNING", "unknown (TimeoutError)"),
                                                             stage("RUNNING", "RUNNING")]}]
    assert st.corrections(quiet) == []
