"""Cross-modal interaction: FILIP's token-wise late interaction and CLIP's global similarity.

Shapes: B_i images with n1 tokens, B_t texts with n2 tokens, d embedding dim.
Tokens are expected unit-norm per token; masks are boolean, True = a real token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.filip import Encoded

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


class _ChunkedLateInteraction(torch.autograd.Function):
    """Late interaction in blocks of [ci images x ct texts]; backward from the saved argmax indices.

    Forward keeps, per (image, text) pair, only which token won each max: int16 tensors
    [B_i, B_t, n1] and [B_i, B_t, n2] instead of the [B_i, B_t, n1, n2] similarities.
    Backward rebuilds, block by block, the sparse coefficient tensor C[i, j, k, r] (the
    derivative of both outputs with respect to <x_ik, y_jr>) and applies it with two matmuls.
    """

    @staticmethod
    def forward(ctx, x, y, xm, ym, ci: int, ct: int, want_i2t: bool, want_t2i: bool):  # type: ignore[override]
        b_i, n1, d = x.shape
        b_t, n2, _ = y.shape
        xw = xm.to(x.dtype)
        yw = ym.to(y.dtype)
        x_count = xw.sum(-1).clamp_min(1)  # [B_i]
        y_count = yw.sum(-1).clamp_min(1)  # [B_t]
        i2t = x.new_empty(b_i, b_t)
        t2i = x.new_empty(b_i, b_t)
        # Which token won each max: the best text token per image token, the best image token per text token.
        arg_r = torch.zeros(b_i, b_t, n1 if want_i2t else 0, dtype=torch.int16, device=x.device)
        arg_k = torch.zeros(b_i, b_t, n2 if want_t2i else 0, dtype=torch.int16, device=x.device)
        if not want_i2t:
            i2t.zero_()
        if not want_t2i:
            t2i.zero_()
        neg = torch.finfo(x.dtype).min
        for i0 in range(0, b_i, ci):
            xs, xms = x[i0 : i0 + ci], xm[i0 : i0 + ci]
            for j0 in range(0, b_t, ct):
                ys, yms = y[j0 : j0 + ct], ym[j0 : j0 + ct]
                # One matmul: [ci*n1, d] @ [d, ct*n2], viewed as [ci, n1, ct, n2] (no copy).
                sim = (xs.reshape(-1, d) @ ys.reshape(-1, d).t()).view(xs.shape[0], n1, ys.shape[0], n2)
                if want_i2t:
                    sim.masked_fill_(~yms[None, None, :, :], neg)
                    best_r, idx_r = sim.max(dim=3)  # [ci, n1, ct]
                    best_r = best_r.transpose(1, 2)  # [ci, ct, n1]
                    i2t[i0 : i0 + ci, j0 : j0 + ct] = (best_r * xw[i0 : i0 + ci, None, :]).sum(-1) / x_count[i0 : i0 + ci, None]
                    arg_r[i0 : i0 + ci, j0 : j0 + ct] = idx_r.transpose(1, 2).to(torch.int16)
                if want_t2i:
                    sim.masked_fill_(~xms[:, :, None, None], neg)
                    best_k, idx_k = sim.max(dim=1)  # [ci, ct, n2]
                    t2i[i0 : i0 + ci, j0 : j0 + ct] = (best_k * yw[None, j0 : j0 + ct, :]).sum(-1) / y_count[None, j0 : j0 + ct]
                    arg_k[i0 : i0 + ci, j0 : j0 + ct] = idx_k.to(torch.int16)
        ctx.save_for_backward(x, y, xw, yw, x_count, y_count, arg_r, arg_k)
        ctx.blocks = (ci, ct)
        ctx.want = (want_i2t, want_t2i)
        ctx.mark_non_differentiable(*[o for o, w in ((i2t, want_i2t), (t2i, want_t2i)) if not w])
        return i2t, t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):  # type: ignore[override]
        x, y, xw, yw, x_count, y_count, arg_r, arg_k = ctx.saved_tensors
        ci, ct = ctx.blocks
        want_i2t, want_t2i = ctx.want
        b_i, n1, d = x.shape
        b_t, n2, _ = y.shape
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(y)
        g_i2t = g_i2t.to(x.dtype) if g_i2t is not None else x.new_zeros(b_i, b_t)
        g_t2i = g_t2i.to(x.dtype) if g_t2i is not None else x.new_zeros(b_i, b_t)
        # Weight of image token k in s^I(i, .) and of text token r in s^T(., j).
        wx = xw / x_count[:, None]  # [B_i, n1]
        wy = yw / y_count[:, None]  # [B_t, n2]
        for i0 in range(0, b_i, ci):
            i1 = min(i0 + ci, b_i)
            for j0 in range(0, b_t, ct):
                j1 = min(j0 + ct, b_t)
                c = x.new_zeros(i1 - i0, j1 - j0, n1, n2)  # d(outputs)/d<x_ik, y_jr> for this block
                if want_i2t:  # image->text: token k of image i routes its gradient to the text token r that won.
                    src = g_i2t[i0:i1, j0:j1, None] * wx[i0:i1, None, :]  # [ci, ct, n1]
                    c.scatter_add_(3, arg_r[i0:i1, j0:j1].long().unsqueeze(-1), src.unsqueeze(-1))
                if want_t2i:  # text->image: token r of text j routes its gradient to the image token k that won.
                    src = g_t2i[i0:i1, j0:j1, None] * wy[None, j0:j1, :]  # [ci, ct, n2]
                    c.scatter_add_(2, arg_k[i0:i1, j0:j1].long().unsqueeze(2), src.unsqueeze(2))
                gx[i0:i1] += torch.einsum("ijkr,jrd->ikd", c, y[j0:j1])
                gy[j0:j1] += torch.einsum("ijkr,ikd->jrd", c, x[i0:i1])
        return gx, gy, None, None, None, None, None, None


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
    full tensor (~40x less for n1=50, n2=77 in fp32).
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
    ci, ct = block_sizes(b_i, b_t, n1, n2, torch.finfo(dtype).bits // 8, memory_mb)
    if directions not in ("both", "i2t", "t2i"):
        raise ValueError(f"directions must be both, i2t or t2i, not {directions!r}")
    return _ChunkedLateInteraction.apply(image_tokens.to(dtype), text_tokens.to(dtype), image_mask, text_mask,
                                         ci, ct, directions != "t2i", directions != "i2t")
