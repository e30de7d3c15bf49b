"""Cross-modal interaction: FILIP's token-wise late interaction and CLIP's global similarity.

Shapes: B_i images with n1 tokens, B_t texts with n2 tokens, d embedding dim.
Tokens are expected unit-norm per token; masks are boolean, True = a real token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.filip import Encoded
from models.late_interaction_blocked import BlockedLateInteraction

INTERACTIONS = ("late", "global")


def similarity(images: Encoded, texts: Encoded, interaction: str, memory_mb: float = 256.0,
               directions: str = "both") -> tuple[Tensor, Tensor]:
    """(s^I, s^T), each [B_i, B_t]: how every image scores every text under `interaction`.

    The one place where late and global differ: "late" is FILIP's token-wise similarity
    (memory-bounded, see `late_interaction_chunked`), "global" CLIP's pooled dot product, the
    same number for both directions. `directions` ("both", "i2t", "t2i") lets late interaction
    skip the direction nobody reads.
    """
    if interaction == "late":
        return late_interaction_chunked(images.tokens, texts.tokens, images.mask, texts.mask, memory_mb, directions)
    if interaction == "global":
        return global_similarity(images.pooled, texts.pooled)
    raise ValueError(f"unknown interaction {interaction!r}; known: {', '.join(INTERACTIONS)}")


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


def block_sizes(b_i: int, b_t: int, n1: int, n2: int, elem_bytes: int, memory_mb: float) -> tuple[int, int]:
    """Largest image block (then text block) whose [ci, ct, n1, n2] similarity fits in memory_mb."""
    budget = max(1, int(memory_mb * 2**20 // (n1 * n2 * elem_bytes)))  # pairs per block
    if budget >= b_t:
        return max(1, min(b_i, budget // b_t)), b_t
    return 1, max(1, budget)


def late_interaction_chunked(
    image_tokens: Tensor,  # [B_i, n1, d]
    text_tokens: Tensor,  # [B_t, n2, d]
    image_mask: Tensor | None = None,  # [B_i, n1] bool
    text_mask: Tensor | None = None,  # [B_t, n2] bool
    memory_mb: float = 256.0,
    directions: str = "both",
) -> tuple[Tensor, Tensor]:
    """`late_interaction` with bounded memory: no [B_i, B_t, n1, n2] tensor in forward or backward.

    directions: "both", "i2t" or "t2i"; the direction not asked for comes back as zeros
    (no gradient) and costs nothing but the shared matmul.

    The similarity is built in blocks of at most `memory_mb`; what autograd keeps is the
    argmax indices (int16, [B_i, B_t, n1 + n2]), about n1*n2/(n1+n2)*2 times less than the
    full tensor (~40x less for n1=50, n2=77 in fp32). On CUDA with Triton the fused kernel of
    models/late_interaction_triton.py runs instead (same contract); elsewhere
    models/late_interaction_blocked.py.
    """
    b_i, n1, _ = image_tokens.shape
    b_t, n2, _ = text_tokens.shape
    if max(n1, n2) > torch.iinfo(torch.int16).max:
        raise ValueError("more than 32767 tokens per sample")
    if image_mask is None:
        image_mask = torch.ones(b_i, n1, dtype=torch.bool, device=image_tokens.device)
    if text_mask is None:
        text_mask = torch.ones(b_t, n2, dtype=torch.bool, device=text_tokens.device)
    dtype = torch.promote_types(image_tokens.dtype, text_tokens.dtype)
    if directions not in ("both", "i2t", "t2i"):
        raise ValueError(f"directions must be both, i2t or t2i, not {directions!r}")
    x, y = image_tokens.to(dtype), text_tokens.to(dtype)
    want_i2t, want_t2i = directions != "t2i", directions != "i2t"
    # Token slots that are padding in every sample (captions end long before the context length) take no part.
    x, image_mask = _cut_trailing_padding(x, image_mask)
    y, text_mask = _cut_trailing_padding(y, text_mask)
    if x.is_cuda and _triton_available():
        from models.late_interaction_triton import late_interaction_triton

        return late_interaction_triton(x, y, image_mask, text_mask, want_i2t, want_t2i)
    ci, ct = block_sizes(b_i, b_t, x.shape[1], y.shape[1], torch.finfo(dtype).bits // 8, memory_mb)
    keep_winners = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    return BlockedLateInteraction.apply(x, y, image_mask, text_mask, ci, ct, want_i2t, want_t2i, keep_winners)


def _cut_trailing_padding(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """[B, n, d], [B, n] -> the first n' slots, n' = 1 + the last slot any sample uses (autograd pads back zeros)."""
    used = mask.any(0).nonzero()
    n = int(used[-1]) + 1 if used.numel() else 1
    if n == mask.shape[1]:
        return tokens, mask
    return tokens[:, :n], mask[:, :n]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
