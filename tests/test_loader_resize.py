"""The training loader continued at another world size: from the merged states of every old rank, each sample of the
epoch is drawn exactly once and every step's global batch (ranks in order, then micro-steps) is bitwise the one an
uninterrupted run gives, through accumulation (fewer ranks than slots) and shared slots (more); states of another
batch layout are refused."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from filipctl.recipes import load_recipe
from jobs.data.loader import ReaderSchedule, ShardSource, TrainBatches, merge_states
from jobs.train.batch_layout import layout_for
from tests.conftest import ROOT
from tests.test_loader import write_source

SAMPLES, PER_SHARD = 96, 12  # 8 shards
GLOBAL, MICRO = 16, 8  # N = 2 slots; one epoch = 6 steps


def _recipe(*sets: str):
    return load_recipe(ROOT / "recipes/smoke.yaml", [
        f"train.global_batch={GLOBAL}", f"train.micro_batch_size={MICRO}", "model.image.image_size=16",
        "model.image.patch_size=8", "data.shuffle_buffer=8", "data.augment=true", "data.text_augment=true",
        "train.seed=5", *sets])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ShardSource:
    return write_source(tmp_path_factory.mktemp("shards") / "a", SAMPLES, PER_SHARD, "a")


@dataclass
class Run:
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # the global batch per step
    keys: list[str] = field(default_factory=list)  # the ids of the samples drawn
    problems: list[str] = field(default_factory=list)  # what every rank logged
    states: list[dict] = field(default_factory=list)  # as a checkpoint stores them


def run(recipe, sources: list[ShardSource], world: int, states: list[dict] | None, start: int, steps: int) -> Run:
    """`steps` steps of every rank of a `world`-rank run, each rank's loader in turn (no process group needed)."""
    layout = layout_for(GLOBAL, recipe.train.micro_batch_size, world)
    ranks = [TrainBatches(recipe, sources, r, layout, states, start) for r in range(world)]
    out = Run()
    for _ in range(steps):
        images, ids = [], []
        for b in ranks:  # rank r holds rows [r G/W, (r+1) G/W) in slot order: its micro-steps, in order
            for _ in range(layout.accumulation):
                i, t = next(b)
                assert len(b.last_keys) == len(i) == layout.micro
                images.append(i)
                ids.append(t)
                out.keys += b.last_keys
        out.batches.append((torch.cat(images), torch.cat(ids)))
    out.problems = [p for b in ranks for p in b.take_problems()]
    out.states = json.loads(json.dumps([b.state() for b in ranks]))
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("worlds", [(2, 1, 2), (2, 4, 2)])  # accumulation 2; shared slots (2 ranks each)
def test_resized_run_draws_the_epoch_once_and_the_batches_of_an_uninterrupted_run(
        source: ShardSource, workers: int, worlds: tuple[int, ...]) -> None:
    recipe = _recipe(f"data.loader_workers={workers}")
    want = run(recipe, [source], 2, None, 0, 6).batches
    assert not torch.equal(want[0][0], want[1][0])  # not vacuous: batches differ, augmented

    got, keys, states, start = [], [], None, 0
    for world, steps in zip(worlds, (3, 2, 1)):  # odd starts: the lane of a step follows from the step
        part = run(recipe, [source], world, states, start, steps)
        got += part.batches
        keys += part.keys
        states = part.states
        start += steps
    counts = Counter(keys)
    assert len(counts) == SAMPLES and set(counts.values()) == {1}, counts.most_common(3)  # the epoch, each once
    for step, ((wi, wt), (gi, gt)) in enumerate(zip(want, got)):
        assert torch.equal(wi, gi) and torch.equal(wt, gt), f"step {step}"


def test_every_reader_lives_in_one_worker_process() -> None:
    """DataLoader worker i % n makes batch i; the readers of one worker's batches must be its alone."""
    for global_batch, micro, world in [(16, 8, 1), (16, 8, 2), (16, 8, 4), (48, 8, 2), (48, 8, 3), (24, 4, 2)]:
        layout = layout_for(global_batch, micro, world)
        for lanes in (1, 2, 3):
            for rank in range(world):
                for start in range(4):
                    schedule = ReaderSchedule(layout, lanes, rank, start)
                    owner: dict[int, int] = {}
                    for i in range(6 * layout.accumulation * lanes):
                        _, reader = schedule.batch(i)
                        assert owner.setdefault(reader, i % lanes) == i % lanes, (layout, lanes, rank, start)
                    assert sorted(owner) == schedule.own_readers()


def test_damage_is_counted_once_at_any_world_size(tmp_path: Path) -> None:
    source = write_source(tmp_path / "a", SAMPLES, PER_SHARD, "a")
    damaged = Path(source.shards[1])
    damaged.write_bytes(damaged.read_bytes()[:1500])  # truncated inside its second sample
    recipe = _recipe("data.augment=false")
    straight = run(recipe, [source], 2, None, 0, 6)
    shared = run(recipe, [source], 4, None, 0, 6)  # 2 ranks read each slot's readers; one counts
    first = run(recipe, [source], 2, None, 0, 3)
    resized = run(recipe, [source], 1, first.states, 3, 3)  # every old rank's counters, once
    assert len(straight.problems) == 1 and str(damaged) in straight.problems[0]

    def totals(r: Run) -> tuple[int, int]:  # what the all-reduce sums
        return sum(s["skipped"] for s in r.states), sum(s["read"] for s in r.states)

    assert totals(straight)[0] > 0
    assert totals(shared) == totals(resized) == totals(straight) and len(shared.problems) == 1


def test_states_of_another_layout_or_incomplete_are_refused(source: ShardSource) -> None:
    states = run(_recipe(), [source], 2, None, 0, 1).states
    with pytest.raises(ValueError, match=r"is for 2 readers \(2 slots = train.global_batch / "
                                         r"train.micro_batch_size, x 1 lanes = data.loader_workers\) and 1 sources; "
                                         r"this run has 4 readers \(2 slots .* x 2 lanes"):
        run(_recipe("data.loader_workers=2"), [source], 2, states, 1, 1)
    with pytest.raises(ValueError, match=r"this run has 4 readers \(4 slots"):  # micro-batches of 4: 4 slots
        run(_recipe("train.micro_batch_size=4"), [source], 2, states, 1, 1)
    with pytest.raises(ValueError, match="every rank's data_rank file of the checkpoint is needed"):
        run(_recipe(), [source], 2, states[:1], 1, 1)
    with pytest.raises(ValueError, match="a data position of step 1 does not resume step 2"):
        run(_recipe(), [source], 2, states, 2, 1)


def test_merging_states() -> None:
    shape = {"readers": 2, "slots": 2, "lanes": 1, "sources": 1}
    at = lambda draws: {"draws": draws, "sources": [[0, draws]]}
    state = lambda reader, draws, read: {**shape, "step": 3, "positions": {str(reader): at(draws)}, "read": read,
                                         "skipped": 1}
    merged = merge_states([state(0, 24, 30), state(1, 24, 26), state(1, 24, 0)], shape, 3)  # rank 2 shares slot 1
    assert (merged.read, merged.skipped, sorted(merged.positions)) == (56, 3, [0, 1])
    with pytest.raises(ValueError, match="two ranks' data positions of reader 1 differ"):
        merge_states([state(0, 24, 0), state(1, 24, 0), state(1, 16, 0)], shape, 3)
    # written before slots and lanes were recorded: taken when readers and sources match (positions mean the same)
    legacy = {"readers": 2, "sources": 1, "positions": {"1": at(8)}, "next": 0, "read": 8, "skipped": 0}
    assert merge_states([legacy], shape, 1).positions[1].draws == 8
    with pytest.raises(ValueError, match="is for 4 readers and 1 sources"):
        merge_states([{**legacy, "readers": 4}], shape, 1)
