"""Fine-grained retrieval: the true caption against captions that differ from it in exactly one attribute.

For each held-out image of the shapes set and each attribute (colour, shape, position), one object
is picked (seeded by the image's key) and every false alternative of that attribute is written into
the caption: another colour no object in the image has, another shape, or a grid cell no object
occupies. The image ranks its true caption and those hard negatives by s^I (the image->text score,
`finegrained_*`); R@1 per attribute is how often the true caption comes first. The same ranking by
s^T (mean over the caption's words of each word's best patch, `finegrained_sT_*`) says whether the
words find the difference when the many background patches do not vote: under the global
interaction both scores are the same number. This is what token-wise late interaction is claimed to
improve: binding a word to the region it describes, where a pooled embedding can blur which
colour belongs to which shape and where.
"""

from __future__ import annotations

import random
from typing import Any

from jobs.data.synthetic import COLOURS, POSITIONS, SHAPES, caption_of

ATTRIBUTES = ("colour", "shape", "position")


def hard_negatives(objects: list[dict[str, Any]], key: str) -> dict[str, list[str]]:
    """attribute -> captions identical to the true one but for that attribute of one object (all alternatives)."""
    rng = random.Random(f"hard-negatives/{key}")
    used = {"colour": {o["colour"] for o in objects}, "position": {o["position"] for o in objects}}
    out: dict[str, list[str]] = {}
    for attribute in ATTRIBUTES:
        target = rng.randrange(len(objects))
        if attribute == "shape":
            choices = [s for s in SHAPES if s != objects[target]["shape"]]
        else:
            choices = [v for v in (COLOURS if attribute == "colour" else POSITIONS) if v not in used[attribute]]
        out[attribute] = [caption_of([{**o, attribute: v} if i == target else o for i, o in enumerate(objects)])
                          for v in choices]
    return out


class FineGrained:
    """Counts, per attribute, how often the true caption outscores all of its hard negatives."""

    def __init__(self, prefix: str = "finegrained") -> None:
        self.prefix = prefix
        self.hits = {a: 0 for a in ATTRIBUTES}
        self.all_hits = 0
        self.images = 0
        self.negatives = {a: 0 for a in ATTRIBUTES}

    def add(self, true_score: float, negative_scores: dict[str, list[float]]) -> None:
        self.images += 1
        every = True
        for attribute, scores in negative_scores.items():
            # Ties go against the true caption: a model that cannot tell them apart has not chosen it.
            won = all(true_score > s for s in scores)
            self.hits[attribute] += int(won)
            self.negatives[attribute] += len(scores)
            every &= won
        self.all_hits += int(every)

    def metrics(self) -> dict[str, float]:
        if not self.images:
            return {}
        total = sum(self.negatives.values()) / self.images
        p = self.prefix
        out = {f"{p}_R1": self.all_hits / self.images, f"chance_{p}_R1": 1.0 / (1.0 + total)}
        for a in ATTRIBUTES:
            out[f"{p}_{a}_R1"] = self.hits[a] / self.images
            out[f"chance_{p}_{a}_R1"] = 1.0 / (1.0 + self.negatives[a] / self.images)
        out[f"{p}_images"] = float(self.images)
        return out
