"""Zero-shot top-1 on single-shape and multi-shape held-out images (jobs/eval/shape_count.py): known predictions give
known subset figures, and the held-out evaluation reports them consistently with its overall top-1."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.data.synthetic import CLASSES, make_sample
from jobs.eval.shape_count import by_shape_count, shape_classes


def test_known_predictions_give_known_subset_accuracies() -> None:
    # Images 0-3 hold one shape, 4-8 several (label first, as the generator records them).
    shapes = [[1], [2], [3], [4], [5, 6], [7, 8, 9], [10, 11], [12, 13], [14, 15, 16]]
    labels = [s[0] for s in shapes]
    predicted = [1, 2, 3, 0,  # single: 3 of 4 right
                 5, 9, 11, 0, 16]  # multi: 1 of 5 right, 3 name another shape of the image, 1 names none
    out = by_shape_count(predicted, labels, shapes)
    assert out == {"zeroshot_top1_single_shape": 0.75, "zeroshot_single_shape_images": 4.0,
                   "zeroshot_top1_multi_shape": 0.2, "zeroshot_multi_shape_other_shape": 0.6,
                   "zeroshot_multi_shape_images": 5.0}
    # Subsets weighted by their counts give the overall top-1.
    overall = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    assert (out["zeroshot_top1_single_shape"] * 4 + out["zeroshot_top1_multi_shape"] * 5) / 9 == pytest.approx(overall)


def test_a_missing_subset_is_left_out_and_a_set_without_shapes_gets_nothing() -> None:
    assert by_shape_count([1, 2], [1, 3], [[1], [3]]) == {"zeroshot_top1_single_shape": 0.5,
                                                          "zeroshot_single_shape_images": 2.0}
    assert by_shape_count([1, 2], [1, 3], [[], []]) == {}  # a clip_benchmark set: no sample records shapes
    with pytest.raises(ValueError, match="2 predictions, 1 labels"):
        by_shape_count([1, 2], [1], [[1]])


def test_the_generator_s_metadata_gives_each_shape_s_class_label_first() -> None:
    for i in range(20):
        _, _, meta = make_sample(0, "eval", i, 32, 3)
        classes = shape_classes(meta, CLASSES)
        assert classes[0] == meta["label"] and len(classes) == len(meta["objects"])
        assert [CLASSES[c] for c in classes] == [f"{o['colour']} {o['shape']}" for o in meta["objects"]]
    assert shape_classes({}, CLASSES) == []


def _raise(url: str, exc: Exception) -> None:
    raise exc


def test_the_held_out_evaluation_reports_the_subsets(tmp_path: Path) -> None:
    import json

    import torch

    from filipctl.recipes import load_recipe
    from filipctl.schema import SyntheticData
    from jobs.data.index import read_classnames, resolve_shards
    from jobs.data.shards import iter_samples
    from jobs.data.synthetic import generate
    from jobs.eval.evaluate import Evaluation, evaluate_set
    from jobs.eval.sets import held_out_set
    from models.filip import build_model
    from tests.conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", ["eval.batch_size=8", "eval.alignment_images=0"])
    torch.manual_seed(0)
    enc = Evaluation.of(build_model(recipe.model).eval(), recipe, tmp_path / "features", tmp_path / "maps")
    generate(str(tmp_path / "tr"), str(tmp_path / "ev"), SyntheticData(train_samples=1, eval_samples=20,
             samples_per_shard=20, image_size=64, max_objects=3, seed=3))
    shards = resolve_shards(str(tmp_path / "ev"))
    held = held_out_set({"url": str(tmp_path / "ev"), "shards": shards, "classnames": read_classnames(shards)})
    flat, results = evaluate_set(enc, held, "smoke", "x")
    counts = [len(json.loads(s["json"])["objects"]) for s in iter_samples(shards, on_error=_raise)]
    single, multi = sum(n == 1 for n in counts), sum(n > 1 for n in counts)
    assert single and multi
    assert flat["zeroshot_single_shape_images"] == single and flat["zeroshot_multi_shape_images"] == multi
    assert (flat["zeroshot_top1_single_shape"] * single + flat["zeroshot_top1_multi_shape"] * multi) / len(counts) \
        == pytest.approx(flat["zeroshot_top1"])
    assert flat["zeroshot_multi_shape_other_shape"] <= 1 - flat["zeroshot_top1_multi_shape"]
    # Figures beside clip_benchmark's, not in its result file.
    zeroshot = next(r for r in results if r["task"] == "zeroshot_classification")
    assert not any("shape" in k for k in zeroshot["metrics"])
