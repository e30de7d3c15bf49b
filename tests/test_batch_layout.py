"""The global batch over W workers (jobs/train/batch_layout.py), its refusals, the recipe's global batch, and the
segments a continued stage records (jobs/train/segments.py): pure, in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.train.batch_layout import LayoutError, layout_for, usable_worlds
from jobs.train.segments import commit_segment, next_segment, read_segments
from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("g, mb, world, accumulation, micro", [
    (64, 32, 2, 1, 32), (64, 32, 1, 2, 32), (64, 32, 4, 1, 16), (64, 32, 8, 1, 8), (256, 32, 2, 4, 32),
    (30720, 160, 192, 1, 160), (30720, 160, 96, 2, 160), (30720, 160, 12, 16, 160)])
def test_every_rank_holds_its_rows_of_the_global_batch_in_slot_order(g, mb, world, accumulation, micro) -> None:
    layout = layout_for(g, mb, world)
    assert (layout.accumulation, layout.micro) == (accumulation, micro)
    assert layout.micro * layout.accumulation * world == g
    rows = []
    for rank in range(world):
        for step in range(layout.accumulation):
            slot, part = layout.slot_of(rank, step)
            rows += range(slot * mb + part * layout.micro, slot * mb + (part + 1) * layout.micro)
    assert rows == list(range(g))  # each row once, rank-major: the gathered batch is the same at every size


@pytest.mark.parametrize("g, mb, world", [(64, 32, 3), (64, 32, 128), (48, 16, 2), (64, 32, 6)])
def test_a_size_that_does_not_split_is_one_line_naming_the_usable_ones(g: int, mb: int, world: int) -> None:
    with pytest.raises(LayoutError) as exc:
        layout_for(g, mb, world)
    message = str(exc.value)
    assert "\n" not in message and f"over {world} workers" in message
    sizes = usable_worlds(g, mb, max(2 * (g // mb), world))
    assert f"run on {', '.join(map(str, sizes))} workers" in message and world not in sizes


def test_a_global_batch_not_a_multiple_of_the_micro_batch_is_refused() -> None:
    with pytest.raises(LayoutError, match="not a multiple of train.micro_batch_size 32"):
        layout_for(100, 32, 1)


def test_the_recipe_keeps_its_global_batch_on_another_number_of_workers(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    # global_batch left null: micro_batch_size x workers as the recipe says them, before --set
    recipe.write_text(f"extends: {ROOT / 'recipes/smoke.yaml'}\ntrain: {{global_batch: null, micro_batch_size: 16, "
                      "workers: 4}\n")
    for workers in (1, 2, 4, 8):
        res = run_cli("recipe", "show", str(recipe), "--set", f"train.workers={workers}", "--json", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        train = json.loads(res.stdout)["train"]
        assert (train["global_batch"], train["workers"]) == (64, workers)
    bad = run_cli("recipe", "validate", str(recipe), "--set", "train.workers=3", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "does not split evenly over 3 workers" in bad.stderr and "run on 1, 2, 4, 8 workers" in bad.stderr


def test_a_segment_is_recorded_once_and_only_by_an_attempt_that_saved(tmp_path: Path) -> None:
    two, one = layout_for(64, 32, 2), layout_for(64, 32, 1)
    first = next_segment([], 0, two)
    commit_segment(tmp_path, first)
    commit_segment(tmp_path, first)  # a second checkpoint of the same attempt
    assert next_segment(read_segments(tmp_path), 20, two) is None  # same size: the segment goes on
    # a 1-worker attempt from step 20 that died before its first checkpoint committed nothing; the next one did
    died = next_segment(read_segments(tmp_path), 20, one)
    assert died is not None and read_segments(tmp_path) == [first]
    commit_segment(tmp_path, next_segment(read_segments(tmp_path), 20, one))
    assert [(s["segment"], s["world_size"], s["start_step"]) for s in read_segments(tmp_path)] == [(0, 2, 0), (1, 1, 20)]
