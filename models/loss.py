"""FILIP's bidirectional contrastive loss over the global batch, as one object: reduce -> gather -> score.

    loss_fn = FilipLoss(interaction="late", token_keep=0.25, gather_dtype="fp16")
    features, scale = model(images, ids)
    loss = loss_fn(features, scale)

Each worker scores its LOCAL rows against ALL gathered columns: its images against every
text (image->text) and its texts against every image (text->image). With equal local
batches the mean of the workers' losses equals the full-batch loss, and the autograd
all-gather carries the other workers' gradients back to the features that produced them.
Without a process group the same object scores the batch against itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.accumulation import concat
from models.filip import Features
from models.gather import gather_features, global_max, world
from models.interaction import INTERACTIONS, similarity
from models.token_selection import select_tokens, slots_needed, token_scores

if TYPE_CHECKING:
    from filipctl.schema import ModelConfig


def reduce_for_gather(local: Features, keep: float, memory_mb: float = 256.0,
                      text_slots: int | None = None) -> Features:
    """What a worker sends: each image's and each text's `keep` fraction of best tokens (see token_selection).

    Images are scored against this worker's texts and texts against its images. `text_slots`: how many text
    slots travel (at least token_selection.slots_needed of every caption sent; FilipLoss passes the longest kept
    caption of the global batch); None keeps ceil(keep * n2). With keep = 1.0 and no text_slots the features go
    out unchanged.
    """
    if keep >= 1.0:
        if text_slots is None:
            return local
        return replace(local, text_tokens=local.text_tokens[:, :text_slots], text_mask=local.text_mask[:, :text_slots])
    img_scores = token_scores(local.image_tokens, local.image_mask, local.text_tokens, local.text_mask, memory_mb)
    txt_scores = token_scores(local.text_tokens, local.text_mask, local.image_tokens, local.image_mask, memory_mb)
    it, im = select_tokens(local.image_tokens, local.image_mask, img_scores, keep)
    tt, tm = select_tokens(local.text_tokens, local.text_mask, txt_scores, keep, text_slots)
    return Features(it, im, tt, tm, local.image_embed, local.text_embed)


def pair_logits(local: Features, gathered: Features, interaction: str,
                memory_mb: float = 256.0) -> tuple[Tensor, Tensor]:
    """-> (i2t [b, B], t2i [b, B]): local images vs all texts, local texts vs all images.

    Rows are the worker's own samples with all their tokens; columns are the gathered
    (possibly reduced) samples of every worker.
    """
    i2t, _ = similarity(local.image, gathered.text, interaction, memory_mb, directions="i2t")
    _, t2i = similarity(gathered.image, local.text, interaction, memory_mb, directions="t2i")
    return i2t, t2i.t()  # t2i was [B, b] (all images x local texts)


def filip_loss(
    local: Features,
    gathered: Features,
    logit_scale: Tensor,  # [1], = 1 / temperature
    offset: int,  # index of this worker's first sample in the gathered batch
    interaction: str = "late",
    memory_mb: float = 256.0,
) -> Tensor:
    """L = 1/2 [CE(rows of s^I / tau) + CE(columns of s^T / tau)], targets on the diagonal."""
    i2t, t2i = pair_logits(local, gathered, interaction, memory_mb)
    b = i2t.shape[0]
    targets = torch.arange(offset, offset + b, device=i2t.device)
    # Scores in fp32 so the softmax is stable whatever the towers ran in.
    loss_i2t = F.cross_entropy(logit_scale.float() * i2t.float(), targets)
    loss_t2i = F.cross_entropy(logit_scale.float() * t2i.float(), targets)
    return 0.5 * (loss_i2t + loss_t2i)


class FilipLoss(nn.Module):
    """The loss of one worker: its local features against the whole (gathered) global batch.

    Configured once; the training loop only calls `loss(features, logit_scale)`.
    """

    def __init__(self, interaction: str = "late", token_keep: float = 1.0, gather_dtype: str = "fp32",
                 memory_mb: float = 256.0) -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"unknown interaction {interaction!r}; known: {', '.join(INTERACTIONS)}")
        self.interaction = interaction
        # Token selection is FILIP's trick for token features; pooled vectors are sent whole.
        self.token_keep = token_keep if interaction == "late" else 1.0
        self.gather_dtype = gather_dtype
        self.memory_mb = memory_mb

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "FilipLoss":
        return cls(cfg.interaction, cfg.token_keep, cfg.gather_dtype, cfg.similarity_memory_mb)

    def describe(self) -> str:
        if self.interaction == "global":
            return "global interaction"
        return f"late interaction, gather {self.gather_dtype} keeping {self.token_keep:.0%} of tokens"

    def forward(self, local: Features | Sequence[Features], logit_scale: Tensor) -> Tensor:
        """`local`: this worker's features, or its micro-batches' (accumulated: models/accumulation.py), each
        reduced for the gather on its own, as a worker of that micro-batch's size would, so that the loss does not
        depend on how many micro-batches a worker runs."""
        parts = [local] if isinstance(local, Features) else list(local)
        text_slots = None
        if self.interaction == "late":
            # Text slots sized to the longest kept caption of the global batch, not the context length.
            text_slots = global_max(max(1, *(slots_needed(p.text_mask, self.token_keep) for p in parts)))
        sent = concat([reduce_for_gather(p, self.token_keep, self.memory_mb, text_slots) for p in parts])
        local = concat(parts)
        gathered = gather_features(sent, self.interaction, self.gather_dtype)
        rank, _ = world()
        offset = rank * local.image_tokens.shape[0]
        return filip_loss(local, gathered, logit_scale, offset, self.interaction, self.memory_mb)
