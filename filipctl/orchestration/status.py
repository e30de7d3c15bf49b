"""`filipctl status`: recent runs and their stages, with the scheduler's word for those still active.

Rows are built once, from records of one shape: the state index's (filipctl/orchestration/state_index.py,
no MLflow import) or, where a store has no index beside it, MLflow's runs read into the same shape.
`ask_schedulers` adds each backend's word for the active stages (one batched query per backend);
`corrections` says which recorded states it contradicts (pure); the CLI records them through the
one writer and, for a stage that completed while nobody watched, its done record (`record`).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from filipctl.contract import (TAG_BACKEND, TAG_JOB, TAG_KEY_METRIC, TAG_KIND, TAG_RAY_RUN, TAG_RECIPE, TAG_STAGE,
                               TAG_VARIANT, TAG_WORKDIR, TAG_STAGE_KEY)
from filipctl.states import State, overall

if TYPE_CHECKING:
    from filipctl.backends.base import Backend

Row = dict[str, Any]


# -- records -> rows ----------------------------------------------------------------------------------------

def _run_row(r: Row) -> Row:
    row = {"kind": r["kind"], "name": r["name"], "run_id": r["run_id"], "recipe": r["recipe"], "backend": r["backend"],
           "state": State.parse(r["state"]).value,
           "started": datetime.fromtimestamp(r["started"]).isoformat(timespec="seconds"),
           "duration_s": (r["ended"] or time.time()) - r["started"]}
    if r.get("variant"):
        row["variant"] = r["variant"]
    return row


def _stage_row(s: Row, backend: str) -> Row:
    since = s.get("running_since")  # a stage's time counts from when it started running, not from when it was queued
    return {"stage": s["stage"], "run_id": s["run_id"], "state": State.parse(s["state"]).value, "scheduler": "",
            "backend": backend, "job_id": s["job_id"] or "", "job": job_label(backend, s["job_id"] or ""),
            "ray_run": s["ray_run"] or "", "folder": s.get("folder") or "", "stage_key": s.get("stage_key") or "",
            "key_metric": s["key_metric"], "value": s["value"],
            "duration_s": (s["ended"] or time.time()) - since if since else None}


def build_rows(top: list[Row], children, stages) -> list[Row]:
    """Newest first: a row per pipeline with its stages, per ablation with its variants.
    `children(run_id)` and `stages(run_id)` give records of the state index's shape."""
    def pipeline(r: Row) -> Row:
        return {**_run_row(r), "stages": [_stage_row(s, r["backend"]) for s in stages(r["run_id"])]}

    return [{**_run_row(r), "variants": [pipeline(v) for v in children(r["run_id"])]} if r["kind"] == "ablation"
            else pipeline(r) for r in top]


def rows_from_index(store, experiment: str, limit: int) -> list[Row]:
    return build_rows(store.top_runs(experiment, limit), store.children, store.stages)


def rows_from_mlflow(client, experiment: str, limit: int) -> list[Row]:
    """For a store with no state index beside it (a server used from another folder): MLflow's runs as records."""
    from filipctl.tracking.runs import pipelines, stage_runs

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    cache: dict[str, list] = {}

    def record(p) -> Row:
        tags = p.data.tags
        return {"kind": tags.get(TAG_KIND, "pipeline"), "name": p.info.run_name, "run_id": p.info.run_id,
                "recipe": tags.get(TAG_RECIPE, ""), "backend": tags.get(TAG_BACKEND, ""), "state": p.info.status,
                "variant": tags.get(TAG_VARIANT, ""), "started": p.info.start_time / 1000,
                "ended": p.info.end_time / 1000 if p.info.end_time else None}

    def stage_record(c) -> Row:
        tags, key = c.data.tags, c.data.tags.get(TAG_KEY_METRIC, "")
        return {"stage": tags.get(TAG_STAGE, c.info.run_name), "run_id": c.info.run_id, "state": c.info.status,
                "job_id": tags.get(TAG_JOB, ""), "ray_run": tags.get(TAG_RAY_RUN, ""), "key_metric": key,
                "value": c.data.metrics.get(key), "folder": tags.get(TAG_WORKDIR, ""),
                "stage_key": tags.get(TAG_STAGE_KEY, ""), "ended": c.info.end_time / 1000 if c.info.end_time else None,
                "running_since": c.info.start_time / 1000}

    def kids(run_id: str) -> list:
        if run_id not in cache:
            cache[run_id] = stage_runs(client, client.get_run(run_id))
        return cache[run_id]

    top = [record(p) for p in pipelines(client, exp.experiment_id, limit, kinds=("pipeline", "ablation"))]
    return build_rows(top, lambda rid: [record(c) for c in kids(rid)], lambda rid: [stage_record(c) for c in kids(rid)])


# -- the schedulers' word ---------------------------------------------------------------------------------------

def job_label(backend: str, ref: str) -> str:
    """What a person can look up (a Slurm job id, a local pid), from the backend's own handle."""
    if not ref:
        return ""
    try:
        from filipctl.backends import attach

        return attach(backend, ref).label
    except Exception:  # the job record is gone (folder moved): nothing to show
        return ""


def stages_of(rows: list[Row]) -> list[Row]:
    """Every stage row of `rows` (pipelines and ablations' variants)."""
    return [s for r in rows for p in r.get("variants", [r]) for s in p["stages"]]


def ask_schedulers(rows: list[Row], backend_for: Callable[[str], Backend] | None = None) -> None:
    """Fill each active stage's `scheduler` with its backend's word, asked once per backend for all of them."""
    from filipctl.backends import get_backend

    backend_for = backend_for or get_backend
    by_backend: dict[str, list[Row]] = {}
    for s in stages_of(rows):
        if s["job_id"] and not State.parse(s["state"]).ended:
            by_backend.setdefault(s["backend"], []).append(s)
    for name, stages in by_backend.items():
        try:
            backend = backend_for(name)
            handles = {s["run_id"]: backend.attach(s["job_id"]) for s in stages}
            states = backend.poll(list(handles.values()))
        except Exception as exc:  # the scheduler may be unreachable from here: show what was recorded
            for s in stages:
                s["scheduler"] = f"unknown ({type(exc).__name__})"
            continue
        for s in stages:
            s["scheduler"] = states.get(handles[s["run_id"]].ref, State.UNKNOWN).value


def corrections(rows: list[Row]) -> list[tuple[Row, State]]:
    """(row, the state to record) for every run whose recorded state the scheduler contradicts.

    Applying them in order (stages before their pipeline, pipelines before their ablation) brings the
    records in line.
    """
    fixes: list[tuple[Row, State]] = []
    for r in rows:
        if "variants" in r:  # an ablation ends when every variant has
            fixes += corrections(r["variants"])
            now = {id(row): s for row, s in fixes}
            variant_states = [now.get(id(v), State.parse(v["state"])) for v in r["variants"]]
            if not State.parse(r["state"]).ended and (final := overall(variant_states)):
                fixes.append((r, final))
            continue
        after: list[State] = []
        for s in r["stages"]:
            state = State.parse(s["state"])
            said = State.__members__.get(s["scheduler"])
            if not state.ended and said in (State.RUNNING, State.COMPLETED, State.FAILED, State.CANCELLED) \
                    and said is not state:
                fixes.append((s, said))
                state = said
            elif not state.ended and not s.get("job_id") and any(a.ended and not a.ok for a in after):
                # Never submitted, after a stage that did not complete (a pipeline's stages are a chain): nothing
                # will run it; the command that would have recorded it SKIPPED is gone (killed).
                fixes.append((s, State.SKIPPED))
                state = State.SKIPPED
            after.append(state)
        if not State.parse(r["state"]).ended and (final := overall(after)):
            fixes.append((r, final))
    return fixes


def record(fixes: list[tuple[Row, State]], tracker) -> None:
    """Write `corrections` through the control side's writer, and into the rows. A stage that completed while
    nobody watched (a detached Slurm job) gets its done record and key metric from its result.json now."""
    from pathlib import Path

    from filipctl.contract import RunDir
    from filipctl.orchestration.stage_folders import record_done

    for row, state in fixes:
        if state is State.COMPLETED and "key_metric" in row and row.get("folder"):
            metrics = record_done(RunDir(Path(row["folder"])), row["stage_key"], row["stage"])
            if metrics is None:  # exit 0 but no result: nothing after it can read it
                state = State.FAILED
            else:
                tracker.log_metrics(row["run_id"], metrics)
                row["value"] = metrics.get(row["key_metric"])
        tracker.set_state(row["run_id"], state)
        row["state"] = state.value


# -- the table ------------------------------------------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
