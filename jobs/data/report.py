"""The JSON report a data tool leaves beside the shards it wrote (filter_report.json, backtranslate_report.json).

One writer and one reader for every data tool, on any fsspec URL: the data stage reads a filter
report back to tell whether a filtered copy can be reused.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec


def _url(folder: str, name: str) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(folder)
    return fs, f"{root.rstrip('/')}/{name}"


def write_report(folder: str, name: str, report: dict[str, Any]) -> None:
    fs, path = _url(folder, name)
    with fs.open(path, "w") as f:
        json.dump(report, f, indent=1)


def read_report(folder: str, name: str) -> dict[str, Any] | None:
    """The report, or None when there is none."""
    fs, path = _url(folder, name)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)
