"""`filipctl status`: recent pipelines and their stages, read from MLflow."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from filipctl import tracking
from filipctl.backends import JobState, get_backend


def _duration(start: int | None, end: int | None) -> float | None:
    if not start:
        return None
    end = end or int(datetime.now().timestamp() * 1000)
    return (end - start) / 1000


ACTIVE = ("RUNNING", "SCHEDULED")
TO_MLFLOW = {JobState.COMPLETED: "FINISHED", JobState.FAILED: "FAILED", JobState.CANCELLED: "KILLED"}


def reconcile(client, run, backend_name: str, job_id: str) -> str:
    """Ask the scheduler about a stage MLflow still thinks is queued or running; fix MLflow if the job ended.

    Returns the scheduler's word for the job ("" when there is no scheduler to ask).
    """
    if not job_id or backend_name == "local":
        return ""
    try:
        state = get_backend(backend_name).status(job_id)
    except Exception as exc:  # the scheduler may be unreachable from here: show MLflow's view
        return f"unknown ({type(exc).__name__})"
    if state in TO_MLFLOW and run.info.status in ACTIVE:
        client.set_terminated(run.info.run_id, status=TO_MLFLOW[state])
        run.info._status = TO_MLFLOW[state]
    return state.value


def job_label(backend_name: str, job_id: str) -> str:
    """What a person can look up: Slurm's job id; local and Ray drivers' ids are record files, not shown."""
    return "" if backend_name in ("local", "ray") else job_id.split("@")[0]


def collect(uri: str, experiment: str, limit: int, ask_scheduler: bool = True) -> list[dict[str, Any]]:
    """Newest first: one dict per pipeline with its stages, scheduler states reconciled into MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                                 max_results=limit, order_by=["attributes.start_time DESC"])
    rows = []
    for p in parents:
        children = client.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT}` = '{p.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        stages = []
        backend = p.data.tags.get(tracking.TAG_BACKEND, "")
        for c in children:
            key = c.data.tags.get(tracking.TAG_KEY_METRIC, "")
            job_id = c.data.tags.get(tracking.TAG_JOB, "")
            scheduler = ""
            if ask_scheduler and (c.info.status in ACTIVE or p.info.status in ACTIVE):
                scheduler = reconcile(client, c, backend, job_id)
            stages.append({
                "stage": c.data.tags.get(tracking.TAG_STAGE, c.info.run_name),
                "run_id": c.info.run_id,
                "state": c.info.status,
                "scheduler": scheduler,
                "job_id": job_id,
                "ray_run": c.data.tags.get(tracking.TAG_RAY_RUN, ""),
                "key_metric": key,
                "value": c.data.metrics.get(key),
                "duration_s": _duration(c.info.start_time, c.info.end_time),
            })
        if p.info.status in ACTIVE and stages and all(s["state"] not in ACTIVE for s in stages):
            final = "FINISHED" if all(s["state"] == "FINISHED" for s in stages) else (
                "KILLED" if any(s["state"] == "KILLED" for s in stages) and not any(s["state"] == "FAILED" for s in stages)
                else "FAILED")
            client.set_terminated(p.info.run_id, status=final)
            p.info._status = final
        rows.append({
            "name": p.info.run_name,
            "run_id": p.info.run_id,
            "recipe": p.data.tags.get(tracking.TAG_RECIPE, ""),
            "backend": p.data.tags.get(tracking.TAG_BACKEND, ""),
            "state": p.info.status,
            "started": datetime.fromtimestamp(p.info.start_time / 1000).isoformat(timespec="seconds"),
            "duration_s": _duration(p.info.start_time, p.info.end_time),
            "stages": stages,
        })
    return rows


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def render(rows: list[dict[str, Any]]):
    from rich.table import Table

    colour = {"FINISHED": "green", "RUNNING": "cyan", "FAILED": "red", "KILLED": "yellow", "SCHEDULED": "blue"}
    table = Table(title="filipctl runs (newest first)", header_style="bold")
    for col in ("run / stage", "recipe", "backend", "state", "job", "key metric", "duration"):
        table.add_column(col, overflow="fold")
    for r in rows:
        st = r["state"]
        table.add_row(f"[bold]{r['name']}[/]", r["recipe"], r["backend"],
                      f"[{colour.get(st, 'white')}]{st}[/]", "", "", fmt_duration(r["duration_s"]))
        for s in r["stages"]:
            value = "-" if s["value"] is None else f"{s['key_metric']}={s['value']:.4g}"
            state = f"[{colour.get(s['state'], 'white')}]{s['state']}[/]"
            if s["scheduler"]:
                state += f" ({s['scheduler'].lower()})"
            job = s["ray_run"] or job_label(r["backend"], s["job_id"])
            table.add_row(f"  └ {s['stage']}", "", "", state, job, value, fmt_duration(s["duration_s"]))
    return table
