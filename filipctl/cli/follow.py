"""The commands that follow runs already started: `status`, `logs` and `cancel`. Registered on the app in app.py."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from filipctl.cli import consoles
from filipctl.cli.options import JsonOpt, RunRef, Tracking, tracking_options
from filipctl.errors import FilipctlError


@tracking_options
def status(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=50000, help="How many recent runs.")] = 10,
    tracking: Tracking = Tracking(),
    as_json: JsonOpt = False,
) -> None:
    """Recent runs and their stages (state, job, key metric, duration since the stage started running).

    Read from the state index kept beside the MLflow store (from MLflow itself where there is none).
    Stages still queued or running are checked with their backend (one sacct call for all on Slurm),
    and what has started or ended since is recorded. Tracking records the store has not taken yet
    (it was down or locked) are sent for a few seconds (--tracking-timeout); the TRACKING column shows
    what still waits (`filipctl sync` sends it all).
    """
    from filipctl.orchestration import status as st
    from filipctl.orchestration import tracking_backlog
    from filipctl.orchestration.state_index import StateStore
    from filipctl import tracking as tr

    uri = tr.resolve_uri(tracking.uri)
    store = StateStore.open_for(uri)  # the index the control side keeps beside MLflow: no MLflow import
    if store is not None:
        rows = st.rows_from_index(store, tracking.experiment, limit)
    else:
        uri = tracking.checked_uri()
        rows = st.rows_from_mlflow(tr.open_store(uri), tracking.experiment, limit)
    st.ask_schedulers(rows)
    fixes = st.corrections(rows)
    if fixes:
        st.record(fixes, tr.Tracker(uri))  # into the index now; into MLflow through the outbox
    note = _send_backlog(uri, store, tracking.timeout_s)
    for s in st.stages_of(rows):
        s["tracking_behind"] = tracking_backlog.behind(s["folder"], uri)
    if note:
        consoles.err.print(f"note: {note}", markup=False, highlight=False)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        consoles.out.print(f"no filipctl runs in experiment {tracking.experiment!r} at {uri}", markup=False,
                           highlight=False)
        return
    from filipctl.reports.status_table import status_table

    consoles.out.print(status_table(rows))


def _send_backlog(uri: str, store, timeout_s: float) -> str:
    """Send what waits for the store for about `timeout_s` -> a line to show when some still waits."""
    from filipctl.orchestration import tracking_backlog
    from filipctl.tracking import check_store

    waiting = tracking_backlog.backlog(uri, store.folders() if store is not None else [])
    if not waiting.pending:
        return ""
    try:
        check_store(uri, timeout_s, must_exist=True)
    except FilipctlError as exc:
        return f"{waiting.pending} tracking records wait for the store, which does not answer: {exc}"
    left = waiting.send(uri, timeout_s)
    return f"{left} tracking records still wait for the store; `filipctl sync` sends them" if left else ""


@tracking_options
def sync(
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Give up after this many seconds (the records "
                                           "stay where they are; run sync again later).")] = 600.0,
    tracking: Tracking = Tracking(),
    as_json: JsonOpt = False,
) -> None:
    """Send MLflow what it has not taken yet: the metrics, tags, artifacts and run states that waited while the
    tracking store was down or locked (jobs and commands never wait for it; they keep it in spools in the stage
    folders and beside the store). Each record goes in with the step and time it was logged at.
    """
    from filipctl.orchestration import tracking_backlog
    from filipctl.orchestration.state_index import StateStore
    from filipctl import tracking as tr

    uri = tr.resolve_uri(tracking.uri)
    store = StateStore.open_for(uri)
    waiting = tracking_backlog.backlog(uri, store.folders() if store is not None else [])
    before = waiting.pending
    if before:  # a store that does not answer at all: one line now, not minutes of retries
        try:
            tr.check_store(uri, tracking.timeout_s, must_exist=True)
        except FilipctlError as exc:
            raise FilipctlError(f"{before} tracking records wait, but {exc}") from None
        if not as_json:
            consoles.err.print(f"sending {before} tracking records to {uri} (for at most {timeout:g} s)",
                               markup=False, highlight=False)
    left = waiting.send(uri, timeout) if before else 0
    if as_json:
        print(json.dumps({"tracking_uri": uri, "waiting": before, "sent": before - left, "left": left}))
    elif not before:
        consoles.out.print(f"nothing waits: MLflow at {uri} has every tracking record", markup=False, highlight=False)
    elif not left:
        consoles.out.print(f"sent {before} tracking records to {uri}; nothing waits", markup=False, highlight=False)
    if left:
        raise FilipctlError(f"{left} of {before} tracking records could not be sent to {uri} within {timeout:g} s "
                            "(is the store up? not locked?); they wait, run `filipctl sync` again")


@tracking_options
def logs(
    run_ref: RunRef = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage (data, pretrain, eval).")] = None,
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, help="Last N lines per stage; 0 = all.")] = 40,
    tracking: Tracking = Tracking(),
) -> None:
    """Print the job logs of a run's stages, wherever they ran (local processes, Slurm or Ray jobs)."""
    from filipctl.backends import attach
    from filipctl.tracking import open_store
    from filipctl.tracking.runs import find_pipeline, stage_jobs

    client = open_store(tracking.checked_uri())
    parent = find_pipeline(client, tracking.experiment, run_ref)
    jobs = [j for j in stage_jobs(client, parent) if stage in (None, j.stage)]
    if not jobs:
        raise FilipctlError(f"run {parent.info.run_name} has no stage {stage!r}")
    for j in jobs:
        handle = attach(j.backend, j.job_id) if j.job_id else None
        consoles.out.rule(f"{j.stage}  {j.state}  job {handle.label if handle and handle.label else '-'}")
        lines = (handle.logs() if handle else "").splitlines()
        sys.stdout.write("\n".join(lines[-tail:] if tail else lines) + "\n")


@tracking_options
def cancel(
    run_ref: RunRef = None,
    tracking: Tracking = Tracking(),
) -> None:
    """Cancel a run: every stage not yet ended is cancelled on its backend and recorded CANCELLED; a stage whose
    job had already ended is recorded as it ended (one that completed with its done record, never CANCELLED)."""
    from filipctl.backends import get_backend
    from filipctl.orchestration import status as st
    from filipctl.states import State, overall
    from filipctl.tracking import Tracker, open_store
    from filipctl.tracking.runs import find_pipeline, stage_jobs

    from filipctl.orchestration.state_index import StateStore

    uri = tracking.checked_uri()
    _send_backlog(uri, StateStore.open_for(uri), tracking.timeout_s)  # what MLflow knows of the jobs is current
    client = open_store(uri)
    parent = find_pipeline(client, tracking.experiment, run_ref)
    tracker = Tracker(uri)
    cancelled = []
    every = stage_jobs(client, parent)
    final = {j.run_id: State.parse(j.state) for j in every}  # each stage's state once cancel is through
    jobs = [j for j in every if not final[j.run_id].ended]
    backends = {j.backend: get_backend(j.backend) for j in jobs if j.job_id}
    handles = {j.run_id: backends[j.backend].attach(j.job_id) for j in jobs if j.job_id}
    said_by = {}
    for backend in backends.values():  # one query per backend for all of its jobs
        said_by.update(backend.poll([h for h in handles.values() if h.backend is backend]))
    for j in jobs:
        handle = handles.get(j.run_id)
        said = said_by.get(handle.ref, State.UNKNOWN) if handle else State.PENDING
        if said.ended:  # recorded as it ended (while nobody watched), as `filipctl status` records it
            row = _stage_row(client, j.run_id, j.stage)
            st.record([(row, said)], tracker)
            final[j.run_id] = State.parse(row["state"])
            continue
        if handle:
            handle.cancel()
        # A stage never submitted will never run: SKIPPED, as the executor of a followed run records it too.
        final[j.run_id] = State.CANCELLED if handle else State.SKIPPED
        tracker.set_state(j.run_id, final[j.run_id])
        cancelled.append(j.stage + (f" (job {handle.label})" if handle and handle.label else ""))
    if not State.parse(parent.info.status).ended:
        # Cancelled only when something was: a run whose stages had all completed is recorded COMPLETED.
        tracker.set_state(parent.info.run_id, State.CANCELLED if cancelled else overall(list(final.values()))
                          or State.CANCELLED)
    if tracker.flush(max(tracking.timeout_s, 10.0)):
        consoles.err.print("note: the MLflow store did not take every record yet; `filipctl sync` sends the rest",
                           markup=False, highlight=False)
    if cancelled:
        consoles.out.print(f"cancelled {parent.info.run_name}: {', '.join(cancelled)}", highlight=False,
                           markup=False)
    else:
        consoles.out.print(f"{parent.info.run_name} has nothing left to cancel ({parent.info.status})",
                           highlight=False, markup=False)


def _stage_row(client, run_id: str, stage: str) -> dict:
    """What `status.record` needs of a stage run to write its done record: its folder, key and key metric."""
    from filipctl.contract import TAG_KEY_METRIC, TAG_STAGE_KEY, TAG_WORKDIR

    tags = client.get_run(run_id).data.tags
    return {"stage": stage, "run_id": run_id, "key_metric": tags.get(TAG_KEY_METRIC, ""),
            "folder": tags.get(TAG_WORKDIR, ""), "stage_key": tags.get(TAG_STAGE_KEY, ""), "state": "", "value": None}
