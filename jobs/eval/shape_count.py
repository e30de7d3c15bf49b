"""Zero-shot top-1 apart on held-out images with one shape and with several.

The shapes set labels an image by its largest shape (jobs/data/synthetic.py), but the picture also
shows the others, and a prompt naming one of them matches it too. On single-shape images the label
is the only right answer; on multi-shape ones a model can pick a shape that is there and still be
counted wrong. Scoring the two subsets apart, and counting how often a miss names another shape of
the image, measures how much of the zero-shot figure that ambiguity accounts for.

Read from what each held-out sample records (its "objects", largest first); a set whose samples
record no shapes (a clip_benchmark set) gets none of these figures.
"""

from __future__ import annotations

from typing import Any, Sequence


def shape_classes(meta: dict[str, Any], classnames: Sequence[str]) -> list[int]:
    """The class of each shape the sample records, largest first; [] when it records none."""
    index = {name: i for i, name in enumerate(classnames)}
    names = [f"{o.get('colour')} {o.get('shape')}" for o in meta.get("objects") or []]
    return [index[n] for n in names if n in index]


def by_shape_count(predicted: Sequence[int], labels: Sequence[int],
                   shapes: Sequence[Sequence[int]]) -> dict[str, float]:
    """predicted, labels: top-1 class and label per image; shapes: each image's shape classes (shape_classes).

    -> zeroshot_top1_single_shape / zeroshot_top1_multi_shape (accuracy on each subset), their image counts
    (zeroshot_single_shape_images, zeroshot_multi_shape_images), and zeroshot_multi_shape_other_shape: the
    share of multi-shape images whose top-1 is another shape of the image (a miss only the label calls one).
    A subset without images is left out; {} when no image records its shapes.
    """
    if not (len(predicted) == len(labels) == len(shapes)):
        raise ValueError(f"{len(predicted)} predictions, {len(labels)} labels, {len(shapes)} shape lists")
    single = [p == y for p, y, s in zip(predicted, labels, shapes) if len(s) == 1]
    multi = [(p == y, p != y and p in s) for p, y, s in zip(predicted, labels, shapes) if len(s) > 1]
    out: dict[str, float] = {}
    if single:
        out["zeroshot_top1_single_shape"] = sum(single) / len(single)
        out["zeroshot_single_shape_images"] = float(len(single))
    if multi:
        out["zeroshot_top1_multi_shape"] = sum(hit for hit, _ in multi) / len(multi)
        out["zeroshot_multi_shape_other_shape"] = sum(other for _, other in multi) / len(multi)
        out["zeroshot_multi_shape_images"] = float(len(multi))
    return out
