"""Zero-shot classification and image<->text retrieval, scored block by block, counted as clip_benchmark counts.

Image queries (classification, image->text retrieval) rank texts by s^I(i, j); text queries
(text->image retrieval) rank images by s^T(i, j). The prompt ensemble averages s^I over the
templates, not the text embeddings (FILIP, section 3.1.2).

Retrieval with several captions per image (clip_benchmark `zeroshot_retrieval`):
text_retrieval_recall@k (image -> text): an image scores 1 when at least one of its captions is in
its top k; image_retrieval_recall@k (text -> image): a caption scores 1 when its image is in its top
k. Without materialising the score matrix: a query's best positive is in the top k exactly when
fewer than k negatives rank above it.

Ties go against the true item: a negative scoring the same as the query's best positive (within TIE)
ranks above it, so no duplicate caption (or image) lifts a recall. clip_benchmark keeps ties in the
order torch.topk returns them (on the CPU not the index order); whatever that order, its
count is at least this one, and the two are the same when nothing ties. Counting ties as hits
(`..._ties_as_hits@k`, reported beside the result file, not in it) is the most any order could give:
the two bracket clip_benchmark's figure, and a gap between them says how much ties decide it. TIE: the
same pair scored in two blocks of different shapes, or the same caption encoded in two batches, can
differ in the last bits.

Fractions are Python floats (count / n), as clip_benchmark's zero-shot accuracy is: no float32 noise
in the result file. clip_benchmark writes its own recalls as float32 means; rounded to float32, the
figures here are those bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from jobs.eval.features import FeatureFile
from models.interaction import similarity

TIE = 1e-6  # fp32 similarities are means of unit-vector dot products: rounding differences stay below this


def _positive_scores(images: FeatureFile, texts: FeatureFile, text_image: Tensor, interaction: str,
                     memory_mb: float, block: int) -> tuple[Tensor, Tensor]:
    """Scores of the matched pairs -> (s^I of each image's best caption [N_img], s^T of each caption [N_txt])."""
    best_i2t = torch.full((len(images),), -math.inf)
    pos_t2i = torch.empty(len(texts))
    for start, txt in texts.blocks(block):
        owners = text_image[start : start + len(txt.tokens)]
        uniq, inverse = owners.unique(return_inverse=True)
        s_i2t, s_t2i = similarity(images.take(uniq), txt, interaction, memory_mb)  # [U, bt]
        cols = torch.arange(len(owners))
        pos_t2i[start : start + len(owners)] = s_t2i[inverse, cols]
        best_i2t.scatter_reduce_(0, owners, s_i2t[inverse, cols], reduce="amax")
    return best_i2t, pos_t2i


class Recalls(NamedTuple):
    clip_benchmark: dict[str, float]  # {image,text}_retrieval_recall@k: ties against the true item
    ties_as_hits: dict[str, float]  # {image,text}_retrieval_recall_ties_as_hits@k: the most any tie order gives


@torch.no_grad()
def retrieval(images: FeatureFile, texts: FeatureFile, text_image: Tensor, interaction: str, memory_mb: float,
              block: int, ks: list[int]) -> Recalls:
    """clip_benchmark's retrieval metrics, and the same with ties counted as hits; text_image[j] = the image
    caption j belongs to."""
    best_i2t, pos_t2i = _positive_scores(images, texts, text_image, interaction, memory_mb, block)
    # negatives at or above (within TIE) / strictly above (beyond TIE) the image's best caption, the caption's image
    tied_i = torch.zeros(len(images), dtype=torch.long)
    above_i = torch.zeros(len(images), dtype=torch.long)
    tied_t = torch.zeros(len(texts), dtype=torch.long)
    above_t = torch.zeros(len(texts), dtype=torch.long)
    for i0, img in images.blocks(block):
        rows = torch.arange(i0, i0 + len(img.tokens))
        for j0, txt in texts.blocks(block):
            cols = slice(j0, j0 + len(txt.tokens))
            s_i2t, s_t2i = similarity(img, txt, interaction, memory_mb)  # [bi, bt]
            negative = text_image[cols][None, :] != rows[:, None]
            tied_i[rows] += ((s_i2t >= best_i2t[rows, None] - TIE) & negative).sum(1)
            above_i[rows] += ((s_i2t > best_i2t[rows, None] + TIE) & negative).sum(1)
            tied_t[cols] += ((s_t2i >= pos_t2i[None, cols] - TIE) & negative).sum(0)
            above_t[cols] += ((s_t2i > pos_t2i[None, cols] + TIE) & negative).sum(0)
    ours: dict[str, float] = {}
    lenient: dict[str, float] = {}
    for k in ks:
        ours[f"image_retrieval_recall@{k}"] = int((tied_t < k).sum()) / len(texts)
        ours[f"text_retrieval_recall@{k}"] = int((tied_i < k).sum()) / len(images)
        lenient[f"image_retrieval_recall_ties_as_hits@{k}"] = int((above_t < k).sum()) / len(texts)
        lenient[f"text_retrieval_recall_ties_as_hits@{k}"] = int((above_i < k).sum()) / len(images)
    return Recalls(ours, lenient)


@torch.no_grad()
def class_scores(images: FeatureFile, prompts: FeatureFile, n_classes: int, interaction: str, memory_mb: float,
                 block: int) -> Tensor:
    """[N_img, C]: s^I averaged over the templates; `prompts` holds template t's C prompts at rows t*C..(t+1)*C."""
    n_templates = len(prompts) // n_classes
    out = torch.empty(len(images), n_classes)
    for i0, img in images.blocks(block):
        total = torch.zeros(len(img.tokens), n_classes)
        for t in range(n_templates):
            for c0 in range(0, n_classes, block):
                c1 = min(c0 + block, n_classes)
                s_i2t, _ = similarity(img, prompts.block(t * n_classes + c0, t * n_classes + c1), interaction,
                                      memory_mb, directions="i2t")
                total[:, c0:c1] += s_i2t
        out[i0 : i0 + len(img.tokens)] = total / n_templates
    return out


def classification(scores: Tensor, labels: Tensor) -> dict[str, float | None]:
    """clip_benchmark's zero-shot metrics from [N, C] scores: acc1, acc5 (None under 5 classes), mean per-class recall."""
    n_classes = scores.shape[1]
    top = scores.topk(min(5, n_classes), dim=1).indices
    hit = top == labels[:, None]
    pred = top[:, 0]
    return {
        "acc1": int(hit[:, 0].sum()) / len(labels),  # as clip_benchmark's accuracy(): a Python float
        "acc5": int(hit.any(1).sum()) / len(labels) if n_classes >= 5 else None,
        "mean_per_class_recall": balanced_accuracy(labels.numpy(), pred.numpy()),
    }


def balanced_accuracy(true, pred) -> float:
    """Mean per-class recall over the classes present (sklearn, as clip_benchmark); predictions of an absent
    class count as misses, which sklearn says in a warning on every call."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(true, pred))
