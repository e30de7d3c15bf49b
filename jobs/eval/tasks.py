"""The evaluation tasks, one object each, and which of them a set gets from what it provides.

    captions                       -> Retrieval            (clip_benchmark zeroshot_retrieval)
    class names                    -> ZeroShot             (zeroshot_classification)
    a train split (and a probe)    -> LinearProbe          (linear_probe)
    object annotations (the shapes -> FineGrainedRetrieval (finegrained_retrieval)
    generator's held-out split)       WordPatchPointing    (word_patch_pointing)

A task observes each batch of the evaluated split as the single pass over it encodes the images
(jobs/eval/split_pass.py), keeping what it needs, then scores once the pass is over. The scores
are clip_benchmark's metrics (the result file's) and extra figures shown beside them (chance levels).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from filipctl.contract import JobError
from filipctl.schema import Recipe
from jobs.data.synthetic import caption_of
from jobs.eval import alignment
from jobs.eval.encoder import Encoder
from jobs.eval.features import FeatureFile
from jobs.eval.hard_negatives import ATTRIBUTES, FineGrained, hard_negatives
from jobs.eval.linear_probe import linear_probe
from jobs.eval.names import HELD_OUT
from jobs.eval.prompts import class_templates, object_prompt
from jobs.eval.scoring import class_scores, classification, retrieval
from jobs.eval.shape_count import by_shape_count, shape_classes
from jobs.eval.sets import EvalBatch, EvalSet
from jobs.eval.split_pass import EncodedSplit, encode_split
from jobs.events import emit
from models.filip import Encoded
from models.interaction import similarity


class Scores(NamedTuple):
    metrics: dict[str, float | None]  # clip_benchmark's, as in the result file (None: undefined for this set)
    extra: dict[str, float]  # reported beside them, not in the result file


class Task:
    """One evaluation task of one set."""

    name: ClassVar[str]  # clip_benchmark's task name (the result file's "task")

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        """One batch of the evaluated split; images: tokens [B, 1+P, d]; first: the split-wide index of batch[0]."""

    def score(self, split: EncodedSplit) -> Scores | None:
        """After the pass; None when there was nothing to score."""
        raise NotImplementedError


class Retrieval(Task):
    """Image <-> text retrieval over the set's captions, R@k as clip_benchmark counts it, ties against the true
    item; beside it, R@k with ties counted as hits (jobs/eval/scoring.py)."""

    name = "zeroshot_retrieval"

    def __init__(self, ds: EvalSet, encoder: Encoder, recipe: Recipe, scratch: Path) -> None:
        self.encoder, self.recipe = encoder, recipe
        # Chance R@1 is 1/N both ways only with one caption per image, as the held-out split has.
        self.chance = ds.name == HELD_OUT
        self.texts = FeatureFile(scratch, f"{ds.name}-{ds.eval_split}-texts")  # [N_txt, L, d] on disk
        self.owners: list[int] = []  # the image of each caption

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        self.owners += [first + i for i, caps in enumerate(batch.captions) for _ in caps]
        self.texts.append(self.encoder.texts([c for caps in batch.captions for c in caps]))

    def score(self, split: EncodedSplit) -> Scores:
        m, ev = self.recipe.model, self.recipe.eval
        self.texts.close()
        recalls = retrieval(split.images, self.texts, torch.tensor(self.owners, dtype=torch.long), m.interaction,
                            m.similarity_memory_mb, ev.batch_size, ev.recall_at)
        self.texts.remove()
        extra = {**recalls.ties_as_hits, **({"chance_R1": 1.0 / split.count} if self.chance else {})}
        return Scores(recalls.clip_benchmark, extra)


class ZeroShot(Task):
    """Zero-shot classification: s^I averaged over the prompt templates (FILIP, section 3.1.2)."""

    name = "zeroshot_classification"

    def __init__(self, ds: EvalSet, encoder: Encoder, recipe: Recipe, scratch: Path) -> None:
        self.ds, self.encoder, self.recipe, self.scratch = ds, encoder, recipe, scratch
        self.labels: list[int] = []
        self.shapes: list[list[int]] = []  # each image's shape classes, largest first (jobs/eval/shape_count.py)

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        self.labels += batch.labels
        self.shapes += [shape_classes(meta, self.ds.classnames or []) for meta in batch.meta]

    def score(self, split: EncodedSplit) -> Scores:
        m, ev = self.recipe.model, self.recipe.eval
        classnames = self.ds.classnames or []
        prompts = FeatureFile(self.scratch, f"{self.ds.name}-prompts")  # template-major: [T * C, L, d]
        for template in class_templates(self.ds, ev):
            prompts.append(self.encoder.texts([template.replace("{c}", c) for c in classnames]))
        prompts.close()
        scores = class_scores(split.images, prompts, len(classnames), m.interaction, m.similarity_memory_mb,
                              ev.batch_size)  # [N, C]
        metrics = classification(scores, torch.tensor(self.labels, dtype=torch.long))
        prompts.remove()
        by_shapes = by_shape_count(scores.topk(1, dim=1).indices[:, 0].tolist(), self.labels, self.shapes)
        return Scores(metrics, {"chance_zeroshot_top1": 1.0 / len(classnames), **by_shapes})


class ProbeFeatures:
    """Observes a split for the linear probe: one vector per image (eval.probe_features) and its class."""

    def __init__(self, recipe: Recipe) -> None:
        how = recipe.eval.probe_features
        if how == "auto":  # what the interaction trains
            how = "pooled" if recipe.model.interaction == "global" else "mean_tokens"
        self.how = how
        self.parts: list[Tensor] = []  # [B, d] per batch
        self.labels: list[int] = []

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        if self.how == "pooled":
            self.parts.append(images.pooled)
        else:  # the mean of the real tokens
            w = images.mask.to(images.tokens.dtype)[..., None]  # [B, n, 1]
            self.parts.append((images.tokens * w).sum(1) / w.sum(1).clamp_min(1))
        self.labels += batch.labels

    @property
    def x(self) -> np.ndarray:  # [N, d]
        return torch.cat(self.parts).numpy()

    @property
    def y(self) -> np.ndarray:  # [N] int64
        return torch.tensor(self.labels, dtype=torch.long).numpy()


class LinearProbe(Task):
    """Logistic regression on frozen image features (jobs/eval/linear_probe.py): the test split's vectors are
    kept during the pass; the train split (and 'val', when the set has one besides the evaluated split) is
    read after it."""

    name = "linear_probe"

    def __init__(self, ds: EvalSet, encoder: Encoder, recipe: Recipe) -> None:
        self.ds, self.encoder, self.recipe = ds, encoder, recipe
        self.test = ProbeFeatures(recipe)

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        self.test.observe(batch, images, first)

    def _read(self, split: str) -> ProbeFeatures:
        features = ProbeFeatures(self.recipe)
        encode_split(self.ds, split, self.encoder, self.recipe.model.image.image_size, [features])
        return features

    def score(self, split: EncodedSplit) -> Scores:
        ds, ev = self.ds, self.recipe.eval
        train = self._read("train")
        # The set's own 'val' split chooses C, unless it is the split being reported (then a share of train does).
        val = self._read("val") if "val" in ds.splits and ds.eval_split != "val" else None
        emit(f"{ds.name}: linear probe on {len(train.labels)} train images")
        try:
            metrics = linear_probe(train.x, train.y, self.test.x, self.test.y, val.x if val else None,
                                   val.y if val else None, ev.probe_val_fraction, ev.seed)
        except ValueError as exc:
            raise JobError(f"eval set {ds.name}: linear probe: {exc}") from None
        return Scores(metrics, {})


class FineGrainedRetrieval(Task):
    """Each image against its true caption and the captions that differ from it in one attribute
    (jobs/eval/hard_negatives.py), ranked by s^I and, separately, by s^T."""

    name = "finegrained_retrieval"

    def __init__(self, encoder: Encoder, recipe: Recipe) -> None:
        self.encoder, self.recipe = encoder, recipe
        self.by_image, self.by_text = FineGrained(), FineGrained("finegrained_sT")

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        m = self.recipe.model
        for i, meta in enumerate(batch.meta):
            objects = meta.get("objects") or []
            if not objects or not all({"colour", "shape", "position"} <= set(o) for o in objects):
                continue
            true = caption_of(objects)
            negatives = hard_negatives(objects, f"{first + i}/{true}")
            texts = self.encoder.texts([true] + [c for a in ATTRIBUTES for c in negatives[a]])
            one = Encoded(images.tokens[i : i + 1], images.mask[i : i + 1], images.pooled[i : i + 1])
            both = similarity(one, texts, m.interaction, m.similarity_memory_mb)  # (s^I, s^T), each [1, texts]
            for counter, direction in zip((self.by_image, self.by_text), both):
                scores = direction[0].tolist()  # the true caption's first, then each attribute's negatives
                by_attribute, at = {}, 1
                for a in ATTRIBUTES:
                    by_attribute[a] = scores[at : at + len(negatives[a])]
                    at += len(negatives[a])
                counter.add(scores[0], by_attribute)

    def score(self, split: EncodedSplit) -> Scores | None:
        metrics = {**self.by_image.metrics(), **self.by_text.metrics()}
        return Scores(metrics, {}) if metrics else None


class WordPatchPointing(Task):
    """For the prompt naming one object, do its colour and shape words best match a patch inside the object's
    box (jobs/eval/alignment.py)?"""

    name = "word_patch_pointing"

    def __init__(self, encoder: Encoder, recipe: Recipe) -> None:
        self.encoder, self.recipe = encoder, recipe
        image = recipe.model.image
        self.centres = alignment.patch_centres(image.image_size // image.patch_size, image.image_size)  # [P, 2]
        self.counter = alignment.Pointing()

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        size, ctx = self.recipe.model.image.image_size, self.encoder.context_length
        for i, meta in enumerate(batch.meta):
            for obj in meta.get("objects") or []:
                if not {"colour", "shape", "box"} <= set(obj):
                    continue
                prompt = self.encoder.prompt(object_prompt(obj["colour"], obj["shape"], self.recipe.eval))
                positions = {kind: alignment.word_position(prompt.ids, obj[kind], ctx) for kind in ("colour", "shape")}
                if None in positions.values():
                    continue
                others = [alignment.scaled_box(o, meta, size) for o in meta["objects"] if o is not obj and "box" in o]
                self.counter.add(images.tokens[i], prompt.tokens, positions,  # type: ignore[arg-type]
                                 alignment.scaled_box(obj, meta, size), others, self.centres)

    def score(self, split: EncodedSplit) -> Scores | None:
        metrics = self.counter.metrics()
        return Scores(metrics, {}) if metrics else None


def tasks_for(ds: EvalSet, encoder: Encoder, recipe: Recipe, scratch: Path) -> list[Task]:
    """The tasks of a set, in the order their results are reported."""
    tasks: list[Task] = []
    if ds.captions:
        tasks.append(Retrieval(ds, encoder, recipe, scratch))
    if ds.classnames:
        tasks.append(ZeroShot(ds, encoder, recipe, scratch))
    if ds.linear_probe:
        tasks.append(LinearProbe(ds, encoder, recipe))
    if ds.objects:
        tasks += [FineGrainedRetrieval(encoder, recipe), WordPatchPointing(encoder, recipe)]
    return tasks
