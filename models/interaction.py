"""Cross-modal interaction: FILIP's token-wise late interaction and CLIP's global similarity.

Shapes: B_i images with n1 tokens, B_t texts with n2 tokens, d embedding dim.
Tokens are expected unit-norm per token; masks are boolean, True = a real token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def late_interaction(
    image_tokens: Tensor,  # [B_i, n1, d]
    text_tokens: Tensor,  # [B_t, n2, d]
    image_mask: Tensor | None = None,  # [B_i, n1] bool
    text_mask: Tensor | None = None,  # [B_t, n2] bool
) -> tuple[Tensor, Tensor]:
    """FILIP token-wise maximum similarity, both directions -> (sim_i2t, sim_t2i), each [B_i, B_t].

    sim_i2t[i, j] = mean over real image tokens k of  max over real text tokens r of <x_ik, y_jr>
    sim_t2i[i, j] = mean over real text tokens r of   max over real image tokens k of <x_ik, y_jr>

    Padded tokens take part in neither the max nor the mean. This reference version
    materialises the [B_i, B_t, n1, n2] similarity tensor.
    """
    b_i, n1, _ = image_tokens.shape
    b_t, n2, _ = text_tokens.shape
    if image_mask is None:
        image_mask = torch.ones(b_i, n1, dtype=torch.bool, device=image_tokens.device)
    if text_mask is None:
        text_mask = torch.ones(b_t, n2, dtype=torch.bool, device=text_tokens.device)

    sim = torch.einsum("ikd,jrd->ijkr", image_tokens, text_tokens)  # [B_i, B_t, n1, n2]
    neg = torch.finfo(sim.dtype).min
    pair_mask = image_mask[:, None, :, None] & text_mask[None, :, None, :]  # [B_i, B_t, n1, n2]
    sim = sim.masked_fill(~pair_mask, neg)

    img_w = image_mask.to(sim.dtype)  # [B_i, n1]
    txt_w = text_mask.to(sim.dtype)  # [B_t, n2]
    # Image -> text: each image token's best text token, averaged over real image tokens.
    best_for_img = sim.amax(dim=3)  # [B_i, B_t, n1]
    sim_i2t = (best_for_img * img_w[:, None, :]).sum(-1) / img_w.sum(-1).clamp_min(1)[:, None]
    # Text -> image: each text token's best image token, averaged over real text tokens.
    best_for_txt = sim.amax(dim=2)  # [B_i, B_t, n2]
    sim_t2i = (best_for_txt * txt_w[None, :, :]).sum(-1) / txt_w.sum(-1).clamp_min(1)[None, :]
    return sim_i2t, sim_t2i


def global_similarity(image_embed: Tensor, text_embed: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP/ALIGN similarity of one pooled unit vector per sample: [B_i, d] x [B_t, d] -> [B_i, B_t] twice.

    Returned as (sim, sim) so the loss treats both interactions alike.
    """
    sim = image_embed @ text_embed.t()
    return sim, sim
