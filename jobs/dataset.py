"""The dataset a recipe points at: its manifest (dataset.json) under `data.url`, any fsspec URL.

The manifest names the train/ and eval/ shards, the class names and the counts; it is written
last, so its presence means every shard is complete.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import fsspec

from filipctl.contract import JobError

if TYPE_CHECKING:
    from filipctl.schema import DataConfig

MANIFEST = "dataset.json"


def read_manifest(url: str) -> dict[str, Any] | None:
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root.rstrip('/')}/{MANIFEST}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def require_dataset(data: "DataConfig") -> dict[str, Any]:
    """The manifest at data.url, or a JobError that says what to do."""
    manifest = read_manifest(data.url)
    if manifest is None:
        how = "run the data stage first" if data.synthetic is not None else "data.synthetic is null"
        raise JobError(f"no dataset at {data.url} ({MANIFEST} missing): {how}")
    return manifest


def shard_urls(root: str, split: str, names: list[str]) -> list[str]:
    return [f"{root.rstrip('/')}/{split}/{n}" for n in names]
