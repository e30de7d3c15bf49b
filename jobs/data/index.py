"""The data stage's index: which shards each source and the held-out split have, and how many samples each holds.

Users name shards as img2dataset writes them (a brace pattern, a glob or a folder, any fsspec URL);
the index resolves those names once into shard lists, reads sample counts from img2dataset's
`{shard}_stats.json` files (scanning a shard once where there is none) and finds the held-out
split's `classnames.txt`. It is written into the run folder (contract.RunDir.data_index), so a
read-only bucket works and nobody writes a manifest by hand.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

import fsspec

from filipctl.contract import JobError, RunDir, write_atomic
from jobs.data.shards import count_samples, expand_urls, iter_samples, shard_digest

if TYPE_CHECKING:
    from filipctl.schema import DataConfig

CLASSNAMES = "classnames.txt"


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def resolve_shards(url: str) -> list[str]:
    """Shard URLs for a brace pattern, a glob, a folder of .tar files or one .tar file; sorted, deduplicated."""
    try:
        return _resolve(url)
    except JobError:
        raise
    except Exception as exc:  # no credentials, no such bucket, a malformed URL: say which URL and why
        why = " ".join(str(exc).split())[:300]
        raise JobError(f"cannot list the shards at {url!r}: {type(exc).__name__}: {why}") from None


def _resolve(url: str) -> list[str]:
    if "{" in url:
        shards = expand_urls(url)
    else:
        fs, path = fsspec.core.url_to_fs(url)
        prefix = _protocol_prefix(url)
        if any(ch in path for ch in "*?["):
            shards = [prefix + p for p in fs.glob(path)]
        elif fs.isdir(path):
            shards = [prefix + p for p in fs.glob(path.rstrip("/") + "/*.tar")]
        elif fs.exists(path):
            shards = [url]
        else:
            shards = []
    shards = sorted(dict.fromkeys(shards))
    if not shards:
        raise JobError(f"no .tar shards at {url}: give a brace pattern (.../{{00000..00099}}.tar), a glob or a folder")
    return shards


def count_shards(shards: list[str], progress: Callable[[int, int], None] | None = None) -> list[int]:
    """Per-shard sample counts: the stats file where there is one, one scan of the shard where not."""
    counts = []
    for i, shard in enumerate(shards):
        try:
            n = count_samples([shard])
        except ValueError as exc:
            raise JobError(str(exc)) from None
        if n is None:
            missing = []
            n = sum(1 for _ in iter_samples([shard], on_error=lambda url, exc: missing.append(exc)))
            if missing and n == 0:
                raise JobError(f"{shard}: cannot read the shard: {missing[0]}")
        counts.append(n)
        if progress:
            progress(i + 1, len(shards))
    return counts


def local_sizes(shards: list[str]) -> list[int | None]:
    """Each local shard's size in bytes (None for remote ones): how a later run sees the data changed."""
    import os

    sizes: list[int | None] = []
    for shard in shards:
        path = shard.removeprefix("file://")
        sizes.append(os.path.getsize(path) if "://" not in path and os.path.exists(path) else None)
    return sizes


def read_classnames(eval_shards: list[str]) -> list[str] | None:
    """clip_benchmark's classnames.txt (one name per line) in the held-out split's folder, if any."""
    folder = eval_shards[0].rsplit("/", 1)[0]
    fs, path = fsspec.core.url_to_fs(f"{folder}/{CLASSNAMES}")
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return [line.strip() for line in f if line.strip()]


def shard_digests(shards: list[str]) -> list[str]:
    """Each shard's identity (shards.shard_digest): what a training reader checks a shard against before reading it."""
    return [shard_digest(shard) for shard in shards]


def data_digest(index: dict[str, Any]) -> str:
    """One identity for everything the index names: each source's URL, weight, shards and their digests."""
    import hashlib

    parts = [{k: entry.get(k) for k in ("url", "weight", "shards", "digests")} for entry in index.get("train", [])]
    if index.get("eval"):
        parts.append({k: index["eval"].get(k) for k in ("url", "shards", "digests", "classnames")})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_index(data: "DataConfig", train_urls: list[tuple[str, float]],
                progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The index of the training sources (url, weight) and the held-out split of `data`."""
    train = []
    for url, weight in train_urls:
        shards = resolve_shards(url)
        counts = count_shards(shards, (lambda d, t, u=url: progress(u, d, t)) if progress else None)
        train.append({"url": url, "weight": weight, "shards": shards, "counts": counts, "sizes": local_sizes(shards),
                      "digests": shard_digests(shards)})
    held_out = None
    if data.eval is not None:
        shards = resolve_shards(data.eval)
        held_out = {"url": data.eval, "shards": shards, "counts": count_shards(shards), "sizes": local_sizes(shards),
                    "digests": shard_digests(shards), "classnames": read_classnames(shards)}
    return {"train": train, "eval": held_out}


def write_index(run_dir: RunDir, index: dict[str, Any]) -> None:
    """data.json, with the index's digest in it: the control side reads it without hashing anything."""
    write_atomic(run_dir.data_index, json.dumps({**index, "digest": data_digest(index)}, indent=1))


def load_index(run_dir: RunDir) -> dict[str, Any]:
    if not run_dir.data_index.is_file():
        raise JobError(f"{run_dir.data_index} not found: run the data stage first")
    return json.loads(run_dir.data_index.read_text())
