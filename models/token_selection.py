"""FILIP's token reduction before the all-gather (paper, "training efficiency").

Each image keeps the fraction `keep` of its tokens with the highest token-wise maximum
similarity against all texts on the same worker, and each text keeps that fraction of its
REAL tokens, scored against all images on the same worker. Padded text tokens are never
selected. Both sides are reduced; what a worker sends is [B, K, d] tokens plus a [B, K] mask:

    K = ceil(keep * n)                      slots per sample (fixed, so every rank gathers the same shape)
    k_b = max(1, ceil(keep * real_b))       slots that hold real tokens for sample b (real_b = its unpadded tokens)

Slots beyond k_b are zeros with mask False, so they take part in neither max nor mean on the
receiving side. Text slots can be fewer than K: `slots_needed` is the most any caption keeps, and the
loss sizes the gather to the longest kept caption of the global batch (captions are far shorter than
the context length: 20 of 77 tokens is typical), so padding does not travel. The scores are computed without gradient (selection is a discrete choice);
the kept tokens keep theirs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def token_scores(
    tokens: Tensor,  # [B, n, d]
    mask: Tensor,  # [B, n] bool
    other: Tensor,  # [B', m, d] the other modality on this worker
    other_mask: Tensor,  # [B', m] bool
    memory_mb: float = 256.0,
) -> Tensor:
    """Each token's maximum similarity over every real token of every `other` sample -> [B, n] (-inf on padding)."""
    b, n, d = tokens.shape
    cols = other[other_mask].to(tokens.dtype)  # [M, d] real tokens only
    # Only real tokens are scored (captions are mostly padding); padding scores -inf.
    flat = tokens[mask]  # [R, d]
    rows_per_block = max(1, int(memory_mb * 2**20 // max(1, cols.shape[0] * tokens.element_size())))
    best = torch.cat([(flat[s : s + rows_per_block] @ cols.t()).amax(dim=1)
                      for s in range(0, flat.shape[0], rows_per_block)]) if flat.shape[0] else flat.new_empty(0)
    out = tokens.new_full((b, n), float("-inf"))
    out[mask] = best
    return out


def keep_counts(mask: Tensor, keep: float) -> tuple[int, Tensor]:
    """-> (K slots per sample, k_b real tokens kept per sample [B])."""
    n = mask.shape[1]
    real = mask.sum(dim=1)
    k_b = torch.ceil(real.to(torch.float64) * keep).long().clamp(min=1)
    return max(1, math.ceil(keep * n)), torch.minimum(k_b, real.clamp(min=1))


def slots_needed(mask: Tensor, keep: float) -> int:
    """Slots that hold every kept real token of every sample: max k_b, or (keep >= 1) the longest real prefix."""
    if mask.shape[0] == 0:
        return 0
    if keep >= 1.0:
        last = torch.arange(1, mask.shape[1] + 1, device=mask.device)[None, :] * mask  # position + 1 of real tokens
        return int(last.amax())
    return int(keep_counts(mask, keep)[1].amax())


def select_tokens(tokens: Tensor, mask: Tensor, scores: Tensor, keep: float,
                  slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Keep each sample's top-scoring tokens: [B, n, d] -> ([B, S, d], mask [B, S]), best first.

    S = `slots` (at least `slots_needed`, e.g. the most any sample of the global batch keeps), K by default.
    With keep >= 1 every token is kept, in place: S truncates the padding after the longest caption."""
    if keep >= 1.0:
        return (tokens, mask) if slots is None else (tokens[:, :slots], mask[:, :slots])
    k_slots, k_b = keep_counts(mask, keep)
    if slots is not None:
        k_slots = slots
    idx = scores.topk(k_slots, dim=1).indices  # [B, K]
    kept = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    kept_mask = torch.arange(k_slots, device=mask.device)[None, :] < k_b[:, None]
    kept_mask &= mask.gather(1, idx)
    return kept * kept_mask[..., None].to(kept.dtype), kept_mask
