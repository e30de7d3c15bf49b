"""The executor's decisions, as a pure state machine: no process, no folder, no MLflow; milliseconds."""

from __future__ import annotations

from filipctl.orchestration.executor import Cancel, DoneRecord, Executor, Limits, Step, Submit
from filipctl.states import State

C, F, X = State.COMPLETED, State.FAILED, State.CANCELLED


def chain(*variants: str, shared_data: bool = True, processes: int = 2) -> dict[str, Step]:
    """data -> pretrain -> eval per variant, the data stage shared (as an ablation's graph has it)."""
    steps = {"data": Step("data")}
    for v in variants:
        steps[f"pre-{v}"] = Step(f"pre-{v}", ("data",), processes)
        steps[f"eval-{v}"] = Step(f"eval-{v}", (f"pre-{v}", "data"))
    return steps


def transitions(ex: Executor) -> list[tuple[str, State, State]]:
    seen: list[tuple[str, State, State]] = []
    ex.subscribe(lambda k, old, new: seen.append((k, old, new)))
    return seen


def drive(ex: Executor, outcome: dict[str, State] | None = None) -> list[list[str]]:
    """Run the executor to its end, every submitted job ending as `outcome` says (default COMPLETED) once all
    submitted at the same time were started -> the keys submitted in each round."""
    rounds = [[d.key for d in ex.start() if isinstance(d, Submit)]]
    while not ex.finished:
        batch = list(ex.active)
        for k in batch:
            ex.observe(k, State.RUNNING)
        new: list[str] = []
        for k in batch:
            new += [d.key for d in ex.observe(k, (outcome or {}).get(k, C)) if isinstance(d, Submit)]
        rounds.append(new)
    return rounds


def test_a_graph_runs_in_dependency_order_one_stage_per_free_slot() -> None:
    ex = Executor(chain("a"), limits=Limits(processes=2))
    seen = transitions(ex)
    assert drive(ex) == [["data"], ["pre-a"], ["eval-a"], []]
    assert all(s is C for s in ex.state.values())
    assert [(k, o.value, n.value) for k, o, n in seen[:4]] == [
        ("data", "PENDING", "QUEUED"), ("data", "QUEUED", "RUNNING"), ("data", "RUNNING", "COMPLETED"),
        ("pre-a", "PENDING", "QUEUED")]


def test_done_records_are_reused_only_while_what_they_read_stands() -> None:
    records = {"data": DoneRecord("d1", {}), "pre-a": DoneRecord("p1", {"data": "d1"}),
               "eval-a": DoneRecord("e1", {"pre-a": "p1", "data": "d1"}),
               # made from an older data result: data reran since, so this one must run again
               "pre-b": DoneRecord("p2", {"data": "d0"}), "eval-b": DoneRecord("e2", {"pre-b": "p2", "data": "d1"})}
    ex = Executor(chain("a", "b"), records)
    decisions = ex.start()
    assert {k for k, s in ex.state.items() if s is State.CACHED} == {"data", "pre-a", "eval-a"}
    assert decisions == [Submit("pre-b")]  # its eval too goes again: made from the stale pretrain
    assert ex.state["eval-b"] is State.PENDING
    # --force / --fresh: nothing is reused
    assert Executor(chain("a"), records, force=True).start() == [Submit("data")]


def test_variants_share_the_data_stage_and_train_side_by_side_where_there_is_room() -> None:
    ex = Executor(chain("a", "b", "c", "d"), limits=Limits(stages=2))
    rounds = drive(ex)
    assert rounds[0] == ["data"]
    assert rounds[1] == ["pre-a", "pre-b"]  # two at a time, never more
    assert sum(len(r) for r in rounds) == 9  # data once, then pretrain and eval of each variant


def test_the_cores_decide_when_no_stage_count_is_given() -> None:
    # 2 cores, pretraining takes 2 processes: one at a time; an eval (1 process) never joins a running pretraining
    ex = Executor(chain("a", "b"), limits=Limits(processes=2))
    ex.start()
    ex.observe("data", C)
    assert ex.active == ["pre-a"]
    assert [d.key for d in ex.observe("pre-a", C)] == ["eval-a"]  # in graph order; pre-b (2 cores) does not fit beside it
    assert [d.key for d in ex.observe("eval-a", C)] == ["pre-b"]
    assert [d.key for d in ex.observe("pre-b", C)] == ["eval-b"]
    # a stage larger than the whole machine still runs, alone
    big = Executor({"x": Step("x", (), 8), "y": Step("y", (), 1)}, limits=Limits(processes=2))
    assert big.start() == [Submit("x")]
    assert big.observe("x", C) == [Submit("y")]


def test_a_failure_skips_only_what_reads_from_it() -> None:
    ex = Executor(chain("a", "b"), limits=Limits(stages=4))
    drive(ex, {"pre-a": F})
    assert ex.state["pre-a"] is F and ex.state["eval-a"] is State.SKIPPED
    assert ex.state["pre-b"] is C and ex.state["eval-b"] is C and ex.state["data"] is C


def test_a_failed_data_stage_runs_nothing_else() -> None:
    ex = Executor(chain("a", "b"))
    ex.start()
    assert ex.observe("data", F) == []
    assert ex.finished and {s for k, s in ex.state.items() if k != "data"} == {State.SKIPPED}


def test_on_a_scheduler_the_whole_graph_is_queued_at_once_with_its_dependencies() -> None:
    ex = Executor(chain("a"), native_dependencies=True)
    assert ex.start() == [Submit("data"), Submit("pre-a", ("data",)), Submit("eval-a", ("pre-a", "data"))]
    # detached: nothing more to decide until a job is seen to end
    assert ex.observe("data", State.QUEUED) == [] and ex.observe("data", State.UNKNOWN) == []


def test_on_a_scheduler_a_failure_cancels_the_queued_jobs_that_wait_for_it() -> None:
    ex = Executor(chain("a"), native_dependencies=True)
    ex.start()
    assert ex.observe("data", F) == [Cancel("pre-a"), Cancel("eval-a")]
    assert ex.state["pre-a"] is State.SKIPPED and ex.finished


def test_a_job_cancelled_from_outside_ends_cancelled_and_skips_what_reads_from_it() -> None:
    ex = Executor(chain("a", "b"), limits=Limits(stages=2))
    ex.start()
    ex.observe("data", C)
    ex.observe("pre-a", State.RUNNING)
    decisions = ex.observe("pre-a", X)  # `filipctl cancel`, scancel, or a scheduler's preemption without requeue
    assert ex.state["pre-a"] is X and ex.state["eval-a"] is State.SKIPPED
    assert decisions == []  # pre-b was already running beside it; nothing new to start
    assert ex.state["pre-b"] is State.QUEUED


def test_ctrl_c_cancels_what_was_submitted_and_a_rerun_resumes_with_what_finished() -> None:
    ex = Executor(chain("a", "b"), limits=Limits(stages=1))
    ex.start()
    ex.observe("data", C)
    ex.observe("pre-a", State.RUNNING)
    assert ex.interrupt() == [Cancel("pre-a")]
    assert ex.state["pre-a"] is X
    assert {ex.state[k] for k in ("eval-a", "pre-b", "eval-b")} == {State.SKIPPED}
    assert ex.finished and ex.interrupt() == []  # a second Ctrl-C has nothing left
    # the rerun: only data left a done record (pretraining resumes from its checkpoint, by itself)
    again = Executor(chain("a", "b"), {"data": DoneRecord("d1", {})}, limits=Limits(stages=1))
    assert again.start() == [Submit("pre-a")] and again.state["data"] is State.CACHED


def test_reports_after_the_end_change_nothing() -> None:
    ex = Executor({"x": Step("x")})
    ex.start()
    ex.interrupt()
    assert ex.observe("x", C) == [] and ex.state["x"] is X  # the job's exit raced the cancel


def test_downstream_is_transitive_and_in_order() -> None:
    ex = Executor(chain("a", "b"))
    assert ex.downstream("data") == ["pre-a", "eval-a", "pre-b", "eval-b"]
    assert ex.downstream("pre-b") == ["eval-b"]
