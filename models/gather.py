"""The autograd-aware feature all-gather of the FILIP loss: every worker scores against the global batch.

Pure torch.distributed: without a process group (or with one process) the features come back
unchanged, so everything built on it runs and is tested in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from models.filip import Features
from models.precision import DTYPES


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_max(value: int) -> int:
    """The largest `value` over every rank (one small all-reduce); `value` itself without a process group."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's `t` along dim 0; backward sums each slot's gradient back to its owner.

    Blocking collectives on purpose: the asynchronous functional all-gather (whose backward is a
    reduce-scatter) is the one suspect of an intermittent heap corruption seen on gloo in CI.
    gloo has no reduce-scatter of its own, so the backward is an all-reduce and a slice.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # [b, ...] -> [world * b, ...]
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(t) for _ in range(ctx.world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # [world * b, ...] -> [b, ...]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every slot
        return grad.chunk(ctx.world)[ctx.rank].contiguous()


def _gather_with_grad(t: Tensor) -> Tensor:
    return _AllGatherWithGrad.apply(t.contiguous())


def _gather_no_grad(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_cast(t: Tensor, wire: torch.dtype) -> Tensor:
    # Cast for the wire, gather once, cast back; autograd casts the returning gradient the same way.
    return _gather_with_grad(t.to(wire)).to(t.dtype)


def gather_features(local: Features, interaction: str, wire_dtype: str = "fp32") -> Features:
    """The global batch's features for `interaction`; gathered tensors keep their gradient.

    Only what the interaction scores travels, in `wire_dtype`: token features and their masks
    for "late", pooled vectors for "global" (the other fields come back empty). Masks travel
    alongside their tokens, slot for slot, so a receiver knows which gathered slots are padding.
    """
    if world()[1] == 1:
        return local
    wire = DTYPES[wire_dtype]
    empty = local.image_tokens.new_empty(0)
    if interaction == "global":
        return Features(empty, empty.bool(), empty, empty.bool(),
                        _gather_cast(local.image_embed, wire), _gather_cast(local.text_embed, wire))
    # gloo has no bool collectives: masks travel as uint8.
    return Features(
        image_tokens=_gather_cast(local.image_tokens, wire),
        image_mask=_gather_no_grad(local.image_mask.to(torch.uint8)).bool(),
        text_tokens=_gather_cast(local.text_tokens, wire),
        text_mask=_gather_no_grad(local.text_mask.to(torch.uint8)).bool(),
        image_embed=empty,
        text_embed=empty,
    )


def gathered_bytes(local: Features, interaction: str, wire_dtype: str, world_size: int) -> int:
    """Bytes one worker receives per step from the feature all-gather (masks included)."""
    size = torch.finfo(DTYPES[wire_dtype]).bits // 8
    if interaction == "global":
        n = local.image_embed.numel() + local.text_embed.numel()
        return n * size * (world_size - 1)
    n = local.image_tokens.numel() + local.text_tokens.numel()
    masks = local.image_mask.numel() + local.text_mask.numel()
    return (n * size + masks) * (world_size - 1)
