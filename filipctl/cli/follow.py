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
    and what has started or ended since is recorded.
    """
    from filipctl.orchestration import status as st
    from filipctl.orchestration.state_index import StateStore

    uri = tracking.checked_uri()
    store = StateStore.open_for(uri)  # the index the control side keeps beside MLflow: no MLflow import
    if store is not None:
        rows = st.rows_from_index(store, tracking.experiment, limit)
    else:
        from filipctl.tracking import open_store

        rows = st.rows_from_mlflow(open_store(uri), tracking.experiment, limit)
    st.ask_schedulers(rows)
    fixes = st.corrections(rows)
    if fixes:
        from filipctl.tracking import Tracker

        st.record(fixes, Tracker(uri))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        consoles.out.print(f"no filipctl runs in experiment {tracking.experiment!r} at {uri}", markup=False,
                           highlight=False)
        return
    from filipctl.reports.status_table import status_table

    consoles.out.print(status_table(rows))


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
    job had already ended is recorded as it ended."""
    from filipctl.backends import get_backend
    from filipctl.states import State
    from filipctl.tracking import Tracker, open_store
    from filipctl.tracking.runs import find_pipeline, stage_jobs

    uri = tracking.checked_uri()
    client = open_store(uri)
    parent = find_pipeline(client, tracking.experiment, run_ref)
    tracker = Tracker(uri)
    cancelled = []
    jobs = [j for j in stage_jobs(client, parent) if not State.parse(j.state).ended]
    backends = {j.backend: get_backend(j.backend) for j in jobs if j.job_id}
    handles = {j.run_id: backends[j.backend].attach(j.job_id) for j in jobs if j.job_id}
    said_by = {}
    for backend in backends.values():  # one query per backend for all of its jobs
        said_by.update(backend.poll([h for h in handles.values() if h.backend is backend]))
    for j in jobs:
        handle = handles.get(j.run_id)
        said = said_by.get(handle.ref, State.UNKNOWN) if handle else State.PENDING
        if said.ended:  # recorded as it ended, not as cancelled
            tracker.set_state(j.run_id, said)
            continue
        if handle:
            handle.cancel()
        # A stage never submitted will never run: SKIPPED, as the executor of a followed run records it too.
        tracker.set_state(j.run_id, State.CANCELLED if handle else State.SKIPPED)
        cancelled.append(j.stage + (f" (job {handle.label})" if handle and handle.label else ""))
    if not State.parse(parent.info.status).ended:
        tracker.set_state(parent.info.run_id, State.CANCELLED)
    if cancelled:
        consoles.out.print(f"cancelled {parent.info.run_name}: {', '.join(cancelled)}", highlight=False,
                           markup=False)
    else:
        consoles.out.print(f"{parent.info.run_name} has nothing left to cancel ({parent.info.status})",
                           highlight=False, markup=False)
