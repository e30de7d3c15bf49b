"""The world sizes a pretraining stage ran at, each from the step it began: `segments.json` in the stage folder.
A segment is recorded with the first checkpoint its attempt saves.

A stage continued on another number of workers (jobs/train/batch_layout.py) is one stage in segments; the record
is what a reader of its numbers needs to know how they were made. MLflow gets each segment as params
(segment.K.world_size, segment.K.start_step, segment.K.layout) on the stage's run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from filipctl.contract import write_atomic
from jobs.train.batch_layout import BatchLayout

SEGMENTS = "segments.json"


def read_segments(folder: Path) -> list[dict[str, Any]]:
    try:
        segments = json.loads((folder / SEGMENTS).read_text())
    except (OSError, ValueError):
        return []
    return segments if isinstance(segments, list) else []


def next_segment(segments: list[dict[str, Any]], start: int, layout: BatchLayout) -> dict[str, Any] | None:
    """The segment a job at `start` with `layout` opens, or None when it continues the last one (same size)."""
    if segments and segments[-1].get("world_size") == layout.world:
        return None
    return {"segment": len(segments), "start_step": start, "world_size": layout.world,
            "accumulation": layout.accumulation, "micro_batch": layout.micro, "layout": layout.describe()}


def segment_params(segment: dict[str, Any]) -> dict[str, str]:
    k = segment["segment"]
    return {f"segment.{k}.world_size": str(segment["world_size"]), f"segment.{k}.start_step": str(segment["start_step"]),
            f"segment.{k}.layout": segment["layout"]}


def commit_segment(folder: Path, segment: dict[str, Any]) -> None:
    """Rank 0, once the attempt that opened `segment` saved its first checkpoint (an attempt that dies before
    leaves no step behind, and no segment): append it, unless it is there already."""
    segments = read_segments(folder)
    if segments and segments[-1] == segment:
        return
    segment = {**segment, "segment": len(segments)}
    write_atomic(folder / SEGMENTS, json.dumps([*segments, segment], indent=1))
