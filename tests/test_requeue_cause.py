"""A requeued Slurm job says why it runs again: how the run before ended and which node went down meanwhile."""

from __future__ import annotations

from filipctl.backends.slurm_requeue import describe, incarnations, node_events

# What Slurm 22.05's accounting says about a job whose second node was lost (tests/test_slurm_lost_node.py).
SACCT = """NODE_FAIL|2026-12-02T09:12:31|2026-12-02T09:13:34|filip-n[1-2]
RUNNING|2026-12-02T09:13:46|Unknown|filip-n[1-2]
"""
EVENTS = "filip-n2|2026-12-02T09:13:34|2026-12-02T09:13:38|DOWN*|Not responding\n"


def test_the_lost_node_is_named_from_slurms_accounting() -> None:
    runs = incarnations(SACCT)
    assert [r.state for r in runs] == ["NODE_FAIL", "RUNNING"] and runs[0].nodes == "filip-n[1-2]"
    assert describe(runs[0], node_events(EVENTS)) == \
        "the run before ended NODE_FAIL: filip-n2 down from 09:13:34, Not responding"


def test_a_requeue_without_node_events_says_how_the_run_before_ended() -> None:
    (before,) = incarnations("PREEMPTED|2026-12-02T09:00:00|2026-12-02T09:30:00|gpu[01-04]\n")
    assert describe(before, node_events("")) == "the run before ended PREEMPTED"
    assert incarnations("garbage\n") == [] and node_events("a|b\n") == []


def test_the_watcher_says_why_a_running_job_was_queued_again(tmp_path, monkeypatch, caplog) -> None:
    """Slurm's accounting stands in here (scripts on PATH answering as sacct/sacctmgr did in the lost-node run): what
    is tested is the watcher's decision to tell the requeue, once, with its cause. The real path is
    tests/test_slurm_lost_node.py."""
    import logging
    import os

    from filipctl.backends.slurm import SacctWatcher

    state = tmp_path / "state"
    state.write_text("RUNNING")
    (tmp_path / "sacct").write_text(
        "#!/bin/sh\ncase \"$*\" in *-D*) printf 'NODE_FAIL|2026-12-02T09:12:31|2026-12-02T09:13:34|filip-n[1-2]\\n"
        "PENDING|Unknown|Unknown|None assigned\\n' ;;\n"
        f"*) echo \"798|$(cat {state})|filip-n[1-2]\" ;; esac\n")
    (tmp_path / "sacctmgr").write_text(f"#!/bin/sh\nprintf '{EVENTS}'\n")
    for tool in ("sacct", "sacctmgr"):
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    watcher = SacctWatcher(min_s=0.0, max_s=0.0)
    caplog.set_level(logging.WARNING, logger="filipctl.backends.slurm")
    assert watcher.states(["798"])["798"].value == "RUNNING"
    state.write_text("PENDING")  # requeued: its NODE_FAIL fell between two calls
    assert watcher.states(["798"])["798"].value == "QUEUED"
    assert watcher.states(["798"])["798"].value == "QUEUED"
    said = [r.getMessage() for r in caplog.records]
    assert said == ["Slurm job 798 was requeued (the run before ended NODE_FAIL: filip-n2 down from 09:13:34, "
                    "Not responding): it continues from its last checkpoint when it starts again"], said
