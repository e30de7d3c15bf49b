"""`filipctl status`: recent pipelines and their stages, read from MLflow."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from filipctl import tracking


def _duration(start: int | None, end: int | None) -> float | None:
    if not start:
        return None
    end = end or int(datetime.now().timestamp() * 1000)
    return (end - start) / 1000


def collect(uri: str, experiment: str, limit: int) -> list[dict[str, Any]]:
    """Newest first: one dict per pipeline with its stages."""
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
        for c in children:
            key = c.data.tags.get(tracking.TAG_KEY_METRIC, "")
            stages.append({
                "stage": c.data.tags.get(tracking.TAG_STAGE, c.info.run_name),
                "run_id": c.info.run_id,
                "state": c.info.status,
                "job_id": c.data.tags.get(tracking.TAG_JOB, ""),
                "key_metric": key,
                "value": c.data.metrics.get(key),
                "duration_s": _duration(c.info.start_time, c.info.end_time),
            })
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
    for col in ("run / stage", "recipe", "backend", "state", "key metric", "duration"):
        table.add_column(col)
    for r in rows:
        st = r["state"]
        table.add_row(f"[bold]{r['name']}[/]", r["recipe"], r["backend"], f"[{colour.get(st, 'white')}]{st}[/]",
                      "", fmt_duration(r["duration_s"]))
        for s in r["stages"]:
            value = "-" if s["value"] is None else f"{s['key_metric']}={s['value']:.4g}"
            table.add_row(f"  └ {s['stage']}", "", "", f"[{colour.get(s['state'], 'white')}]{s['state']}[/]",
                          value, fmt_duration(s["duration_s"]))
    return table
