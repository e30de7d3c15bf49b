"""Exact accumulation (models/accumulation.py): micro-batches whose cached features are scored together give the loss
and the gradients of the whole batch in one forward, in one process (the distributed case is the same loss object's
all-gather: tests/test_distributed_loss.py)."""

from __future__ import annotations

import pytest
import torch

from models.accumulation import cached_gradients, surrogate
from models.loss import FilipLoss
from models.tokenizer import tokenize
from tests.test_distributed_loss import CAPTIONS, CONTEXT, _build_model


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(len(CAPTIONS), 3, 32, 32, generator=g), tokenize(CAPTIONS, CONTEXT)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulated(model, loss_fn, images, ids, parts: int):
    """The training loop's accumulated step: cached forwards, one loss, a forward + surrogate backward per part."""
    model.zero_grad(set_to_none=True)
    chunks = list(zip(images.chunk(parts), ids.chunk(parts)))
    with torch.no_grad():
        outs = [model(i, t) for i, t in chunks]
    loss, grads, scale_grad = cached_gradients(loss_fn, [f for f, _ in outs], outs[0][1])
    for a, (i, t) in enumerate(chunks):
        features, scale = model(i, t)
        surrogate(features, grads[a], scale, scale_grad if a == 0 else None).backward()
    return loss, _grads(model)


@pytest.mark.parametrize("interaction", ["late", "global"])
def test_accumulated_micro_batches_give_the_whole_batch_loss_and_gradients(interaction: str) -> None:
    model = _build_model()
    images, ids = _batch()
    loss_fn = FilipLoss(interaction)
    features, scale = model(images, ids)
    whole = loss_fn(features, scale)
    whole.backward()
    reference = _grads(model)
    for parts in (2, 4):
        loss, grads = _accumulated(model, loss_fn, images, ids, parts)
        assert torch.allclose(loss, whole.detach(), rtol=1e-6, atol=0), (parts, loss, whole)
        assert grads.keys() == reference.keys()
        for name, g in grads.items():
            assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-7), (parts, name)
    # the temperature's gradient is counted once, not once per micro-batch
    scale_param = next(n for n in reference if "scale" in n or "temp" in n)
    assert torch.allclose(grads[scale_param], reference[scale_param], rtol=1e-4)


def test_accumulation_is_not_plain_per_micro_batch_losses() -> None:
    """What the cached features buy: per-micro-batch losses contrast against a quarter of the batch."""
    model = _build_model()
    images, ids = _batch()
    loss_fn = FilipLoss("late")
    exact, _ = _accumulated(model, loss_fn, images, ids, 4)
    with torch.no_grad():
        plain = sum(loss_fn(*model(i, t)) for i, t in zip(images.chunk(4), ids.chunk(4))) / 4
    assert abs(exact.item() - plain.item()) > 1e-3


def test_token_selection_is_per_micro_batch_and_the_gradient_still_exact() -> None:
    """With token_keep < 1 each micro-batch chooses its tokens against its own texts (as a worker of that size
    does); the accumulated gradient is that loss's gradient, with graphs through every micro-batch at once."""
    model = _build_model()
    images, ids = _batch()
    loss_fn = FilipLoss("late", token_keep=0.5)
    model.zero_grad(set_to_none=True)
    outs = [model(i, t) for i, t in zip(images.chunk(2), ids.chunk(2))]
    direct = loss_fn([f for f, _ in outs], outs[0][1])
    direct.backward()
    reference = _grads(model)
    loss, grads = _accumulated(model, loss_fn, images, ids, 2)
    assert torch.allclose(loss, direct.detach(), rtol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, reference[name], rtol=1e-4, atol=1e-7), name
