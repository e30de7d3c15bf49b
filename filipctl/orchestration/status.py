"""`filipctl status`: recent pipelines and their stages, read from MLflow.

`collect` only reads: MLflow's view, plus the scheduler's word for stages MLflow still shows as
queued or running. `corrections` says which runs MLflow has wrong (a detached Slurm job that
ended, a job that started); the CLI records them through the one writer, `tracking.Tracker`.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from filipctl.backends import JobState, get_backend
from filipctl.contract import (TAG_BACKEND, TAG_JOB, TAG_KEY_METRIC, TAG_KIND, TAG_RAY_RUN, TAG_RECIPE,
                               TAG_STAGE, TAG_VARIANT)
from filipctl.tracking.runs import pipelines, stage_runs
from filipctl.tracking import ACTIVE

# What MLflow should say once the scheduler says this.
TO_MLFLOW = {JobState.COMPLETED: "FINISHED", JobState.FAILED: "FAILED", JobState.CANCELLED: "KILLED",
             JobState.RUNNING: "RUNNING"}


def _duration(start: int | None, end: int | None) -> float | None:
    if not start:
        return None
    end = end or int(datetime.now().timestamp() * 1000)
    return (end - start) / 1000


def scheduler_state(backend_name: str, job_id: str) -> JobState | str:
    """The scheduler's word for a job ("" when there is no scheduler to ask, as for local jobs)."""
    if not job_id or backend_name == "local":
        return ""
    try:
        return get_backend(backend_name).status(job_id)
    except Exception as exc:  # the scheduler may be unreachable from here: show MLflow's view
        return f"unknown ({type(exc).__name__})"


def job_label(backend_name: str, job_id: str) -> str:
    """What a person can look up: Slurm's job id; local and Ray drivers' ids are record files, not shown."""
    return "" if backend_name in ("local", "ray") else job_id.split("@")[0]


def _stage_row(c, backend: str, ask_scheduler: bool, parent_active: bool) -> dict[str, Any]:
    key = c.data.tags.get(TAG_KEY_METRIC, "")
    job_id = c.data.tags.get(TAG_JOB, "")
    scheduler = ""
    if ask_scheduler and (c.info.status in ACTIVE or parent_active):
        scheduler = scheduler_state(backend, job_id)
    return {
        "stage": c.data.tags.get(TAG_STAGE, c.info.run_name),
        "run_id": c.info.run_id,
        "state": c.info.status,
        "scheduler": scheduler.value if isinstance(scheduler, JobState) else scheduler,
        "job_id": job_id,
        "ray_run": c.data.tags.get(TAG_RAY_RUN, ""),
        "key_metric": key,
        "value": c.data.metrics.get(key),
        "duration_s": _duration(c.info.start_time, c.info.end_time),
    }


def collect(client, experiment: str, limit: int, ask_scheduler: bool = True) -> list[dict[str, Any]]:
    """Newest first: one dict per pipeline with its stages and, for active ones, the scheduler's state."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    rows = []
    for p in pipelines(client, exp.experiment_id, limit, kinds=("pipeline", "ablation")):
        row = _run_row(p)
        if p.data.tags.get(TAG_KIND) == "ablation":
            row["variants"] = [_pipeline_row(client, v, ask_scheduler) for v in stage_runs(client, p)]
        else:
            row = _pipeline_row(client, p, ask_scheduler)
        rows.append(row)
    return rows


def _run_row(p) -> dict[str, Any]:
    return {
        "kind": p.data.tags.get(TAG_KIND, "pipeline"),
        "name": p.info.run_name,
        "run_id": p.info.run_id,
        "recipe": p.data.tags.get(TAG_RECIPE, ""),
        "backend": p.data.tags.get(TAG_BACKEND, ""),
        "state": p.info.status,
        "started": datetime.fromtimestamp(p.info.start_time / 1000).isoformat(timespec="seconds"),
        "duration_s": _duration(p.info.start_time, p.info.end_time),
    }


def _pipeline_row(client, p, ask_scheduler: bool) -> dict[str, Any]:
    backend = p.data.tags.get(TAG_BACKEND, "")
    row = _run_row(p)
    if p.data.tags.get(TAG_VARIANT):
        row["variant"] = p.data.tags[TAG_VARIANT]
    row["stages"] = [_stage_row(c, backend, ask_scheduler, p.info.status in ACTIVE) for c in stage_runs(client, p)]
    return row


def collect_state(store, experiment: str, limit: int, ask_scheduler: bool = True) -> list[dict[str, Any]]:
    """As `collect`, from the state index (filipctl/orchestration/state_index.py): no MLflow import, milliseconds for any store size."""

    def run_row(r: dict[str, Any]) -> dict[str, Any]:
        return {"kind": r["kind"], "name": r["name"], "run_id": r["run_id"], "recipe": r["recipe"],
                "backend": r["backend"], "state": r["state"],
                "started": datetime.fromtimestamp(r["started"]).isoformat(timespec="seconds"),
                "duration_s": (r["ended"] or time.time()) - r["started"]}

    def pipeline_row(r: dict[str, Any]) -> dict[str, Any]:
        row = run_row(r)
        if r["variant"]:
            row["variant"] = r["variant"]
        row["stages"] = []
        for s in store.stages(r["run_id"]):
            scheduler: JobState | str = ""
            if ask_scheduler and (s["state"] in ACTIVE or r["state"] in ACTIVE):
                scheduler = scheduler_state(r["backend"], s["job_id"] or "")
            row["stages"].append({
                "stage": s["stage"], "run_id": s["run_id"], "state": s["state"],
                "scheduler": scheduler.value if isinstance(scheduler, JobState) else scheduler,
                "job_id": s["job_id"] or "", "ray_run": s["ray_run"] or "", "key_metric": s["key_metric"],
                "value": s["value"], "duration_s": (s["ended"] or time.time()) - s["started"],
            })
        return row

    rows = []
    for r in store.top_runs(experiment, limit):
        if r["kind"] == "ablation":
            rows.append({**run_row(r), "variants": [pipeline_row(v) for v in store.children(r["run_id"])]})
        else:
            rows.append(pipeline_row(r))
    return rows


def _pipeline_state(stages: list[dict[str, Any]]) -> str | None:
    """A pipeline's end state once none of its stages is active (None while one is)."""
    states = [s["state"] for s in stages]
    if not states or any(s in ACTIVE for s in states):
        return None
    if all(s == "FINISHED" for s in states):
        return "FINISHED"
    return "KILLED" if "KILLED" in states and "FAILED" not in states else "FAILED"


def corrections(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(row, the state MLflow should record) for every run whose recorded state the scheduler contradicts.

    Applying them in order (stages before their pipeline) brings the rows and MLflow in line.
    """
    fixes: list[tuple[dict[str, Any], str]] = []
    for r in rows:
        if "variants" in r:  # an ablation ends when every variant has
            fixes += corrections(r["variants"])
            states = {**{id(v): v["state"] for v in r["variants"]}, **{id(row): s for row, s in fixes}}
            variant_states = [{"state": states[id(v)]} for v in r["variants"]]
            if r["state"] in ACTIVE and (final := _pipeline_state(variant_states)):
                fixes.append((r, final))
            continue
        after: list[dict[str, Any]] = []
        for s in r["stages"]:
            state = s["state"]
            want = TO_MLFLOW.get(JobState(s["scheduler"])) if s["scheduler"] in JobState.__members__ else None
            if state in ACTIVE and want and want != state:
                fixes.append((s, want))
                state = want
            after.append({**s, "state": state})
        if r["state"] in ACTIVE:
            final = _pipeline_state(after)
            if final:
                fixes.append((r, final))
    return fixes


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _variant_metric(v: dict[str, Any]) -> str:
    last = v["stages"][-1] if v["stages"] else None
    if not last or last["value"] is None:
        return "-"
    return f"{last['key_metric']}={last['value']:.4g}"


def render(rows: list[dict[str, Any]]):
    from rich.markup import escape
    from rich.table import Table

    colour = {"FINISHED": "green", "RUNNING": "cyan", "FAILED": "red", "KILLED": "yellow", "SCHEDULED": "blue"}
    table = Table(title="filipctl runs (newest first)", header_style="bold")
    for col in ("run / stage", "recipe", "backend", "state", "job", "key metric", "duration"):
        table.add_column(col, overflow="fold")
    for r in rows:
        st = r["state"]
        label = f"[bold]{escape(r['name'])}[/]" + (f" ({len(r['variants'])} variants)" if "variants" in r else "")
        table.add_row(label, escape(r["recipe"]), r["backend"],
                      f"[{colour.get(st, 'white')}]{st}[/]", "", "", fmt_duration(r["duration_s"]))
        for v in r.get("variants", []):
            vst = v["state"]
            table.add_row(f"  ▸ {escape(v.get('variant', v['name']))}", "", "", f"[{colour.get(vst, 'white')}]{vst}[/]",
                          "", _variant_metric(v), fmt_duration(v["duration_s"]))
        for s in r.get("stages", []):
            value = "-" if s["value"] is None else f"{s['key_metric']}={s['value']:.4g}"
            state = f"[{colour.get(s['state'], 'white')}]{s['state']}[/]"
            if s["scheduler"]:
                state += f" ({s['scheduler'].lower()})"
            job = s["ray_run"] or job_label(r["backend"], s["job_id"])
            table.add_row(f"  └ {escape(s['stage'])}", "", "", state, escape(job), value, fmt_duration(s["duration_s"]))
    return table


def record(fixes: list[tuple[dict[str, Any], str]], tracker) -> None:
    """Write `corrections` to MLflow (and its state index) through the control side's writer, and into the rows.

    A stage that finished while nobody watched (a detached Slurm job) gets its key metric read now.
    """
    for row, state in fixes:
        if state == "RUNNING":
            tracker.running(row["run_id"])
        else:
            tracker.end(row["run_id"], state)
        if state == "FINISHED" and "key_metric" in row:
            row["value"] = tracker.metrics(row["run_id"]).get(row["key_metric"])
        row["state"] = state
