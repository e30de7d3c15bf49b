"""Exact gradient accumulation for a loss that spans the whole global batch (GradCache, Gao et al. 2021).

A contrastive loss is not a sum over micro-batches: every sample is scored against every other one. Plain
accumulation would shrink the batch the loss contrasts against to one micro-batch. Instead, per optimizer step:

    1. forward every micro-batch without a graph            -> features F_1..F_A (no activations kept)
    2. the loss over all of them, once, and its gradient    -> dL/dF_1..dL/dF_A, dL/dscale
    3. for each micro-batch a: forward again with a graph, backward <F_a, dL/dF_a> (+ scale . dL/dscale once)

Step 3's gradients add up to dL/dtheta of the loss over the whole batch: the same loss, the same gradient (up to the
order of floating-point sums) as one forward of all A micro-batches, at the memory of one. The forward runs twice.
Pure torch; with a process group the loss's all-gather makes step 2 a collective, as the plain loss is.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from models.filip import Features

FLOAT_FIELDS = ("image_tokens", "text_tokens", "image_embed", "text_embed")  # the masks carry no gradient


def as_leaves(features: Features) -> Features:
    """The features detached from whatever produced them, each a leaf that collects its gradient."""
    return replace(features, **{name: getattr(features, name).detach().requires_grad_()
                                for name in FLOAT_FIELDS})


def cached_gradients(loss_fn: Callable[[Sequence[Features], Tensor], Tensor], parts: Sequence[Features],
                     scale: Tensor, loss_scale: float = 1.0) -> tuple[Tensor, list[dict[str, Tensor | None]], Tensor | None]:
    """Step 2: the loss over all micro-batches' features -> (loss, per micro-batch {field: dL/dfield}, dL/dscale),
    the gradients in fp32.

    `loss_fn(parts, scale)` is the loss over the concatenated parts (models.loss.FilipLoss takes a list).
    `loss_scale`: fp16's loss scale, applied before the backward (gradients of about 1/global batch per element
    would underflow in fp16 otherwise) and taken off again in fp32."""
    leaves = [as_leaves(p) for p in parts]
    scale_leaf = scale.detach().requires_grad_()
    loss = loss_fn(leaves, scale_leaf)
    inputs = [getattr(leaf, name) for leaf in leaves for name in FLOAT_FIELDS] + [scale_leaf]
    # unused inputs: the pooled vectors under late interaction
    grads = [None if g is None else g.float() / loss_scale
             for g in torch.autograd.grad(loss * loss_scale, inputs, allow_unused=True)]
    per_part = [dict(zip(FLOAT_FIELDS, grads[i * len(FLOAT_FIELDS):(i + 1) * len(FLOAT_FIELDS)]))
                for i in range(len(parts))]
    return loss.detach(), per_part, grads[-1]


def surrogate(features: Features, grads: dict[str, Tensor | None], scale: Tensor,
              scale_grad: Tensor | None) -> Tensor:
    """Step 3: a scalar whose gradient through `features` (and `scale`, when scale_grad is given: once per step, as
    the loss holds it once) is the cached one. Its value means nothing; the loss is what step 2 returned."""
    total = scale.new_zeros((), dtype=torch.float32)
    for name in FLOAT_FIELDS:
        g = grads.get(name)
        if g is not None:
            total = total + (getattr(features, name).float() * g.float()).sum()
    # The scale takes part every time (with a zero weight but once): gradient reaching an output of the forward is
    # what runs DeepSpeed's backward prologue for each micro-batch.
    total = total + (scale.float() * (scale_grad.float() if scale_grad is not None else 0.0)).sum()
    return total


def concat(parts: Sequence[Features]) -> Features:
    """Micro-batches' features as one batch (rows in micro-batch order)."""
    if len(parts) == 1:
        return parts[0]
    return Features(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Features)})
