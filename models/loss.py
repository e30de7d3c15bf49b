"""FILIP's bidirectional contrastive loss over a (possibly gathered) global batch.

Each worker scores its LOCAL rows against ALL gathered columns: its images against every
text (image->text) and its texts against every image (text->image). With equal local
batches the mean of the workers' losses equals the full-batch loss, and the autograd
all-gather carries the other workers' gradients back to the features that produced them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.filip import Features
from models.interaction import late_interaction_chunked
from models.token_selection import select_tokens, token_scores


def reduce_for_gather(local: Features, keep: float, memory_mb: float = 256.0) -> Features:
    """What a worker sends: each image's and each text's `keep` fraction of best tokens (see token_selection).

    Images are scored against this worker's texts and texts against its images. With
    keep = 1.0 the features go out unchanged.
    """
    if keep >= 1.0:
        return local
    img_scores = token_scores(local.image_tokens, local.image_mask, local.text_tokens, local.text_mask, memory_mb)
    txt_scores = token_scores(local.text_tokens, local.text_mask, local.image_tokens, local.image_mask, memory_mb)
    it, im = select_tokens(local.image_tokens, local.image_mask, img_scores, keep)
    tt, tm = select_tokens(local.text_tokens, local.text_mask, txt_scores, keep)
    return Features(it, im, tt, tm, local.image_embed, local.text_embed)


def pair_logits(local: Features, gathered: Features, interaction: str,
                memory_mb: float = 256.0) -> tuple[Tensor, Tensor]:
    """-> (i2t [b, B], t2i [b, B]): local images vs all texts, local texts vs all images.

    Rows are the worker's own samples with all their tokens; columns are the gathered
    (possibly reduced) samples of every worker.
    """
    if interaction == "late":
        i2t, _ = late_interaction_chunked(local.image_tokens, gathered.text_tokens.to(local.image_tokens.dtype),
                                          local.image_mask, gathered.text_mask, memory_mb, directions="i2t")
        _, t2i = late_interaction_chunked(gathered.image_tokens.to(local.text_tokens.dtype), local.text_tokens,
                                          gathered.image_mask, local.text_mask, memory_mb, directions="t2i")
        return i2t, t2i.t()  # t2i was [B, b] (images x local texts)
    if interaction == "global":
        return local.image_embed @ gathered.text_embed.t(), local.text_embed @ gathered.image_embed.t()
    raise ValueError(f"unknown interaction {interaction!r}")


def filip_loss(
    local: Features,
    gathered: Features,
    logit_scale: Tensor,  # scalar, = 1 / temperature
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
