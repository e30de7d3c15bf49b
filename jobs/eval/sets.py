"""Evaluation sets: clip_benchmark's WebDataset layout and the pretraining data's held-out split, read in batches.

clip_benchmark layout (what `clip_benchmark_export_wds` writes, and `wds/...` sets on the Hugging Face hub):

    URL/classnames.txt                          one class name per line (classification)
    URL/zeroshot_classification_templates.txt   one prompt per line, '{c}' = the class name
    URL/dataset_type.txt                        'retrieval' (absent = classification)
    URL/SPLIT/nshards.txt, URL/SPLIT/0.tar ...  samples: KEY.webp|png|jpg|jpeg + KEY.cls (class index)
                                                or KEY.txt (the image's captions, one per line)

The held-out split is img2dataset's layout (KEY.jpg, KEY.txt, KEY.json with "label" when the
folder has classnames.txt). Nothing is held in memory but one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import torch
from torch import Tensor

from filipctl.contract import JobError
from jobs.data.index import resolve_shards
from jobs.data.loader import decode_image, image_transform
from jobs.data.shards import ErrorLog, caption, iter_samples, metadata

CLASSIFICATION, RETRIEVAL = "classification", "retrieval"


@dataclass
class EvalSet:
    """One set to evaluate on: its shards per split and what the layout says about it."""

    name: str
    url: str
    kind: str  # classification (may also carry captions: the held-out split) or retrieval
    splits: dict[str, list[str]]  # split -> shard URLs
    classnames: list[str] | None = None
    templates: list[str] | None = None  # with '{c}'; None = the recipe's prefixes x suffixes
    captions: bool = False  # samples carry captions: image<->text retrieval applies
    linear_probe: bool = False
    objects: bool = False  # samples carry shape boxes (the shapes generator): pointing accuracy applies
    eval_split: str = "test"


@dataclass
class EvalBatch:
    images: Tensor  # [B, 3, H, W]
    captions: list[list[str]]  # per image, one or more (empty for a classification set)
    labels: list[int]  # per image (empty for a retrieval set)
    meta: list[dict[str, Any]] = field(default_factory=list)  # img2dataset json members (held-out split)
    raw: list[Any] = field(default_factory=list)  # PIL images, kept only when asked for (alignment maps)


def _read_text(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(f"{url} is not UTF-8 text") from None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _classnames(text: str) -> list[str]:
    """One name per line, read as clip_benchmark reads them: a blank line inside the file is a class (so the
    indices of the names after it do not shift); only blank lines at the end are dropped."""
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    return names


def _split_shards(root: str, split: str) -> list[str] | None:
    """The split's shards: nshards.txt names {0..n-1}.tar (clip_benchmark); without it, every .tar there."""
    folder = f"{root}/{split}"
    nshards = _read_text(f"{folder}/nshards.txt")
    if nshards is not None:
        try:
            n = int(nshards.strip())
        except ValueError:
            raise JobError(f"{folder}/nshards.txt should hold the number of shards, not {nshards.strip()[:40]!r}") from None
        if n < 1:
            raise JobError(f"{folder}/nshards.txt says {n} shards: the split is empty")
        return [f"{folder}/{i}.tar" for i in range(n)]
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.isdir(path):
        return None
    return resolve_shards(folder)


def open_benchmark(url: str, name: str | None, split: str, linear_probe: bool) -> EvalSet:
    """A set in clip_benchmark's layout; raises JobError naming the URL and what is missing."""
    root = url.rstrip("/")
    name = name or root.rsplit("/", 1)[-1]
    try:
        kind_text = _read_text(f"{root}/dataset_type.txt")
        kind = (kind_text or CLASSIFICATION).strip().lower()
        if kind not in (CLASSIFICATION, RETRIEVAL):
            raise JobError(f"{root}/dataset_type.txt says {kind!r}; filipctl evaluates 'retrieval' and classification "
                           "(no dataset_type.txt); multilabel sets are not supported")
        shards = _split_shards(root, split)
        if not shards:
            raise JobError(f"eval set {name}: no split {split!r} at {root}/{split} (expected nshards.txt and "
                           "0.tar, 1.tar, ... as clip_benchmark_export_wds writes them)")
        splits: dict[str, list[str]] = {split: shards}
        if kind == RETRIEVAL:
            return EvalSet(name, root, kind, splits, captions=True, eval_split=split)
        if linear_probe and split != "train":  # the probe's splits: looked for only when a probe will run
            for extra in ("train", "val"):
                try:
                    found = _split_shards(root, extra)
                except JobError as exc:
                    print(f"note: eval set {name}: split {extra!r} not used: {exc}", flush=True)
                    found = None
                if found and extra != split:
                    splits[extra] = found
        names_text = _read_text(f"{root}/classnames.txt")
        if names_text is None:
            raise JobError(f"eval set {name}: {root}/classnames.txt is missing (a classification set needs its class "
                           "names; a retrieval set needs dataset_type.txt saying 'retrieval')")
        templates_text = _read_text(f"{root}/zeroshot_classification_templates.txt")
        templates = _lines(templates_text) if templates_text is not None else None
        if templates is not None and not all("{c}" in t for t in templates):
            bad = next(t for t in templates if "{c}" not in t)
            raise JobError(f"eval set {name}: template {bad!r} in zeroshot_classification_templates.txt has no '{{c}}'")
        return EvalSet(name, root, kind, splits, classnames=_classnames(names_text), templates=templates or None,
                       linear_probe=linear_probe and "train" in splits and split != "train", eval_split=split)
    except JobError:
        raise
    except Exception as exc:  # unreachable bucket, no credentials: name the set and the cause
        raise JobError(f"eval set {name}: cannot read {root}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def held_out_set(entry: dict[str, Any]) -> EvalSet:
    """The pretraining data's held-out split, from the data stage's index."""
    return EvalSet("held_out", entry["url"], CLASSIFICATION, {"test": entry["shards"]},
                   classnames=entry.get("classnames"), captions=True, objects=True)


def _label(sample: dict[str, Any], held_out: bool) -> int:
    if held_out:
        return int(metadata(sample)["label"])
    raw = sample.get("cls")
    if raw is None:
        raise ValueError(f"sample {sample['__key__']!r} has no .cls member")
    return int(raw.decode() if isinstance(raw, bytes) else raw)


def _captions(sample: dict[str, Any], held_out: bool) -> list[str]:
    if held_out:
        return [caption(sample)]
    # One caption per line; clip_benchmark writes a newline inside a caption as the two characters \n.
    found = [c.replace("\\n", "\n") for c in caption(sample).splitlines() if c.strip()]
    if not found:
        raise ValueError(f"sample {sample['__key__']!r} has no caption in its .txt member")
    return found


def batches(ds: EvalSet, split: str, image_size: int, batch_size: int, problems: ErrorLog,
            keep_raw: int = 0) -> Iterator[EvalBatch]:
    """The split in order, `batch_size` samples at a time; samples that cannot be decoded go to `problems`
    (counted, named, left out); a shard that cannot be read stops the evaluation (JobError).

    keep_raw: keep the decoded PIL image of the first `keep_raw` samples (for the alignment maps).
    """
    transform = image_transform(image_size, augment=False)
    held_out = ds.name == "held_out"

    def on_shard_error(url: str, exc: Exception) -> None:
        if isinstance(exc, ValueError) and ("tar member" in str(exc) or "has two" in str(exc)):
            problems(url, exc)  # an odd member: the sample is still read
            return
        # Figures from part of a set cannot be compared with published ones: stop, and say which shard.
        raise JobError(f"eval set {ds.name}: cannot read {url}: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]}") from None

    want_labels = ds.classnames is not None
    n_classes = len(ds.classnames or [])
    seen = 0
    batch = EvalBatch([], [], [], [], [])
    for sample in iter_samples(ds.splits[split], on_error=on_shard_error):
        try:
            pil = decode_image(sample)
            label = _label(sample, held_out) if want_labels else -1
            if want_labels and not 0 <= label < n_classes:
                raise ValueError(f"sample {sample['__key__']!r}: class {label} is not in 0..{n_classes - 1} "
                                 f"({n_classes} names in classnames.txt)")
            caps = _captions(sample, held_out) if ds.captions else []
            meta = metadata(sample) if held_out else {}
        except Exception as exc:  # one bad sample is counted and named, the rest is evaluated
            problems(sample.get("__url__", "?"), exc)
            continue
        batch.images.append(transform(pil))
        batch.captions.append(caps)
        if want_labels:
            batch.labels.append(label)
        batch.meta.append(meta)
        if seen < keep_raw:
            batch.raw.append(pil)
        seen += 1
        if len(batch.images) == batch_size:
            yield EvalBatch(torch.stack(batch.images), batch.captions, batch.labels, batch.meta, batch.raw)
            batch = EvalBatch([], [], [], [], [])
    if batch.images:
        yield EvalBatch(torch.stack(batch.images), batch.captions, batch.labels, batch.meta, batch.raw)
