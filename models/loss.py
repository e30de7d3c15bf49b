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
from models.interaction import late_interaction


def pair_logits(local: Features, gathered: Features, interaction: str) -> tuple[Tensor, Tensor]:
    """-> (i2t [b, B], t2i [b, B]): local images vs all texts, local texts vs all images."""
    if interaction == "late":
        i2t, _ = late_interaction(local.image_tokens, gathered.text_tokens, local.image_mask, gathered.text_mask)
        _, t2i = late_interaction(gathered.image_tokens, local.text_tokens, gathered.image_mask, local.text_mask)
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
) -> Tensor:
    """L = 1/2 [CE(rows of s^I / tau) + CE(columns of s^T / tau)], targets on the diagonal."""
    i2t, t2i = pair_logits(local, gathered, interaction)
    b = i2t.shape[0]
    targets = torch.arange(offset, offset + b, device=i2t.device)
    # Scores in fp32 so the softmax is stable whatever the towers ran in.
    loss_i2t = F.cross_entropy(logit_scale.float() * i2t.float(), targets)
    loss_t2i = F.cross_entropy(logit_scale.float() * t2i.float(), targets)
    return 0.5 * (loss_i2t + loss_t2i)
