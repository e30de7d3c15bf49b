"""One pass over a split of an evaluation set: every batch read once, its images encoded once, shown to observers.

The observers (the tasks of the set, the alignment maps) keep what they need of each batch; the
pass itself keeps only the image token features on disk when asked (retrieval and zero-shot score
them after the pass), the count of images and the samples it could not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filipctl.contract import JobError
from jobs.data.shards import ErrorLog
from jobs.eval.encoder import Encoder
from jobs.eval.features import FeatureFile
from jobs.eval.sets import EvalBatch, EvalSet, batches
from jobs.events import emit
from models.filip import Encoded


class Observer(Protocol):
    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        """One batch: `images` its encoded images, `first` the split-wide index of its first image."""


@dataclass
class EncodedSplit:
    """What a pass leaves behind."""

    count: int  # images read
    skipped: int  # samples that could not be read
    images: FeatureFile | None  # [count, 1+P, d] image tokens on disk, readable (None when not asked for)


def encode_split(ds: EvalSet, split: str, encoder: Encoder, image_size: int, observers: list[Observer],
                 scratch: Path | None = None, keep_raw: int = 0) -> EncodedSplit:
    """Read `split` of `ds` in batches of the encoder's size. scratch: write the image features there;
    keep_raw: keep the first `keep_raw` decoded images for the observers (the alignment maps draw them)."""
    problems = ErrorLog()
    images = FeatureFile(scratch, f"{ds.name}-{split}-images") if scratch is not None else None
    count = 0
    for batch in batches(ds, split, image_size, encoder.batch_size, problems, keep_raw=keep_raw):
        encoded = encoder.images(batch.images)
        if images is not None:
            images.append(encoded)
        for observer in observers:
            observer.observe(batch, encoded, count)
        count += len(batch.images)
        emit(f"{ds.name} {split}: {count} images", done=count)
    if images is not None:
        images.close()
    for message in problems.messages:
        print(f"skipped ({ds.name} {split}): {message}", flush=True)
    if not count:
        raise JobError(f"eval set {ds.name}: no readable sample in split {split!r} ({ds.url}); "
                       f"{problems.messages[0] if problems.messages else 'the shards are empty'}")
    return EncodedSplit(count, problems.count, images)
