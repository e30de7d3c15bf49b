"""The `filipctl status` table: runs newest first, an ablation's variants, each pipeline's stages."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from filipctl.orchestration.status import fmt_duration

COLOUR = {"COMPLETED": "green", "CACHED": "green", "RUNNING": "cyan", "FAILED": "red", "CANCELLED": "yellow",
          "SKIPPED": "yellow", "QUEUED": "blue", "PENDING": "blue"}


def _state(state: str) -> str:
    return f"[{COLOUR.get(state, 'white')}]{state}[/]"


def _variant_metric(v: dict[str, Any]) -> str:
    last = v["stages"][-1] if v["stages"] else None
    if not last or last["value"] is None:
        return "-"
    return f"{last['key_metric']}={last['value']:.4g}"


def status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="filipctl runs (newest first)", header_style="bold")
    for col in ("run / stage", "recipe", "backend", "state", "job", "key metric", "duration", "tracking"):
        table.add_column(col, overflow="fold")
    for r in rows:
        label = f"[bold]{escape(r['name'])}[/]" + (f" ({len(r['variants'])} variants)" if "variants" in r else "")
        table.add_row(label, escape(r["recipe"]), r["backend"], _state(r["state"]), "", "", fmt_duration(r["duration_s"]),
                      "")
        for v in r.get("variants", []):
            table.add_row(f"  ▸ {escape(v.get('variant', v['name']))}", "", "", _state(v["state"]), "",
                          _variant_metric(v), fmt_duration(v["duration_s"]), "")
        for s in r.get("stages", []):
            value = "-" if s["value"] is None else f"{s['key_metric']}={s['value']:.4g}"
            state = _state(s["state"])
            if s["scheduler"] and s["scheduler"] != s["state"]:
                state += f" ({s['scheduler'].lower()})"
            behind = s.get("tracking_behind") or 0
            table.add_row(f"  └ {escape(s['stage'])}", "", "", state, escape(s["ray_run"] or s["job"]), value,
                          fmt_duration(s["duration_s"]), f"[yellow]{behind} behind[/]" if behind else "sent")
    return table
