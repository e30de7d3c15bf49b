"""The training loader on real shards in img2dataset's layout: every sample once per epoch across ranks and
loader workers, each shard read by one reader, exact resume from a state, mixing by weight, damage skipped."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from filipctl.recipes import load_recipe
from jobs.data.loader import ReaderPlan, ReaderStream, Problems, ShardSource, TrainBatches, epoch_samples
from jobs.data.shards import ShardWriter
from jobs.train.batch_layout import layout_for
from tests.conftest import ROOT


def write_source(folder: Path, n: int, per_shard: int, tag: str) -> ShardSource:
    """n samples, each image a flat colour that encodes its index, caption naming the index."""
    with ShardWriter(str(folder), per_shard) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(buf, format="PNG")
            w.write({"png": buf.getvalue(), "txt": f"{tag} sample {i}", "json": {"key": "", "i": i, "tag": tag,
                                                                                  "alt_captions": [f"{tag} alt {i}"]}})
        shards = w.close()
    counts = [json.loads(Path(s[: -len(".tar")] + "_stats.json").read_text())["successes"] for s in shards]
    return ShardSource(str(folder), 1.0, tuple(shards), tuple(counts))


def keys_of_epoch(plan: ReaderPlan, reader: int, src: int = 0) -> list[str]:
    return [s["__key__"] for s in epoch_samples(plan, src, 0, reader, Problems())]


@pytest.mark.parametrize("shards_per_source", [8, 3])  # more shards than readers, and fewer
def test_two_ranks_two_workers_read_every_sample_once_per_epoch(tmp_path: Path, shards_per_source: int) -> None:
    n = 96
    source = write_source(tmp_path / "a", n, n // shards_per_source, "a")
    world, workers = 2, 2
    plan = ReaderPlan((source,), world * workers, seed=3, shuffle_buffer=10)
    opened: Counter = Counter()
    seen: Counter = Counter()
    for reader in range(plan.readers):
        keys = keys_of_epoch(plan, reader)
        seen.update(keys)
        opened.update({k[:5] for k in keys})  # the shard number prefixes the key
        assert keys, f"reader {reader} got nothing"
    assert len(seen) == n and set(seen.values()) == {1}  # every sample exactly once in the epoch
    if shards_per_source >= plan.readers:
        # each shard's samples all went to one reader: its shard, read by that reader alone
        owners = {}
        for reader in range(plan.readers):
            for k in keys_of_epoch(plan, reader):
                assert owners.setdefault(k[:5], reader) == reader
    # the next epoch reshuffles the shard order and the samples
    again = [s["__key__"] for s in epoch_samples(plan, 0, 1, 0, Problems())]
    assert again != keys_of_epoch(plan, 0)


def _recipe(tmp_path: Path, *sets: str):
    return load_recipe(ROOT / "recipes/smoke.yaml", [
        "train.micro_batch_size=4", "model.image.image_size=16", "model.image.patch_size=8", "data.shuffle_buffer=8",
        "data.augment=true", "data.text_augment=true", "train.seed=5", *sets])


def _batches(recipe, sources, rank: int, world: int, states=None, start: int = 0) -> TrainBatches:
    """Rank `rank` of `world`, one micro-batch per step (global batch = micro_batch_size x world)."""
    mb = recipe.train.micro_batch_size
    return TrainBatches(recipe, sources, rank, layout_for(mb * world, mb, world), states, start)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_gives_the_batches_an_uninterrupted_loader_gives(tmp_path: Path, workers: int) -> None:
    sources = [write_source(tmp_path / "a", 60, 10, "a")]
    recipe = _recipe(tmp_path, f"data.loader_workers={workers}")
    straight = _batches(recipe, sources, rank=1, world=2)
    want = [next(straight) for _ in range(9)]  # several epochs of this rank's readers (30 samples / 4 per batch)
    first = [_batches(recipe, sources, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        for b in first:
            next(b)
    states = json.loads(json.dumps([b.state() for b in first]))  # as a checkpoint stores them
    resumed = _batches(recipe, sources, rank=1, world=2, states=states, start=5)
    got = [next(resumed) for _ in range(4)]
    for (wi, wt), (gi, gt) in zip(want[5:], got):
        assert torch.equal(wi, gi) and torch.equal(wt, gt)
    # not vacuous: batches differ from one another and the augmentation is on
    assert not torch.equal(want[5][0], want[6][0])


def test_resume_into_another_layout_is_refused(tmp_path: Path) -> None:
    sources = [write_source(tmp_path / "a", 20, 10, "a")]
    first = [_batches(_recipe(tmp_path), sources, rank=r, world=2) for r in range(2)]
    for b in first:
        next(b)
    with pytest.raises(ValueError, match="readers"):
        _batches(_recipe(tmp_path, "data.loader_workers=2"), sources, rank=0, world=2,
                 states=[b.state() for b in first], start=1)


def test_sources_are_mixed_by_weight(tmp_path: Path) -> None:
    a = write_source(tmp_path / "a", 40, 10, "a")
    b = write_source(tmp_path / "b", 40, 10, "b")
    plan = ReaderPlan((ShardSource(a.url, 3.0, a.shards, a.counts), ShardSource(b.url, 1.0, b.shards, b.counts)),
                      1, 0, 4)
    stream = ReaderStream(plan, 0, None, Problems())
    tags = Counter(json.loads(stream.draw()[0]["json"])["tag"] for _ in range(400))
    assert 0.68 < tags["a"] / 400 < 0.82, tags  # 3:1


def test_damaged_shard_and_image_are_skipped_counted_and_named(tmp_path: Path) -> None:
    source = write_source(tmp_path / "a", 40, 10, "a")
    damaged = Path(source.shards[1])
    damaged.write_bytes(damaged.read_bytes()[:1500])  # truncated inside the second sample
    problems = Problems()
    plan = ReaderPlan((source,), 1, 0, 0)
    keys = [s["__key__"] for s in epoch_samples(plan, 0, 0, 0, problems)]
    assert 30 <= len(keys) < 40
    messages, skipped, lost = problems.take()
    assert skipped == lost == 40 - len(keys) and len(messages) == 1 and str(damaged) in messages[0], messages
    # through the whole loader: the batches keep coming, the state counts what was skipped
    recipe = _recipe(tmp_path, "data.augment=false")
    batches = _batches(recipe, [source], rank=0, world=1)
    for _ in range(12):
        next(batches)
    assert batches.skipped >= 40 - len(keys) and any(str(damaged) in p for p in batches.take_problems())
    assert batches.read >= 40  # the lost samples count as read: the bad fraction is of what the shards hold
