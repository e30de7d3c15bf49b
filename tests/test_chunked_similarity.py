"""The memory-bounded late interaction equals the reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.interaction import block_sizes, late_interaction, late_interaction_chunked


def _case(b_i: int, b_t: int, n1: int, n2: int, d: int, dtype=torch.float64):
    x = F.normalize(torch.randn(b_i, n1, d, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b_t, n2, d, dtype=dtype), dim=-1).requires_grad_()
    xm = torch.rand(b_i, n1) < 0.8
    ym = torch.rand(b_t, n2) < 0.5
    xm[:, 0] = ym[:, 0] = True
    return x, y, xm, ym


@pytest.mark.parametrize("memory_mb", [1e-5, 2e-3, 0.05, 1000.0])  # 1 pair per block ... everything in one block
@pytest.mark.parametrize("shape", [(5, 7, 6, 9, 8), (16, 12, 50, 77, 16), (1, 3, 4, 2, 3)])
def test_forward_and_gradients_equal_reference(shape, memory_mb: float) -> None:
    torch.manual_seed(sum(shape))
    x, y, xm, ym = _case(*shape)
    ref_i2t, ref_t2i = late_interaction(x, y, xm, ym)
    g1, g2 = torch.randn_like(ref_i2t), torch.randn_like(ref_t2i)
    ref_gx, ref_gy = torch.autograd.grad((ref_i2t * g1).sum() + (ref_t2i * g2).sum(), (x, y))
    i2t, t2i = late_interaction_chunked(x, y, xm, ym, memory_mb=memory_mb)
    gx, gy = torch.autograd.grad((i2t * g1).sum() + (t2i * g2).sum(), (x, y))
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gy, ref_gy)


def test_fp32_within_fp32_tolerance() -> None:
    torch.manual_seed(0)
    x, y, xm, ym = _case(8, 8, 50, 77, 64, dtype=torch.float32)
    ref = late_interaction(x, y, xm, ym)
    ref_g = torch.autograd.grad(sum(r.sum() for r in ref), (x, y))
    out = late_interaction_chunked(x, y, xm, ym, memory_mb=0.1)
    out_g = torch.autograd.grad(sum(o.sum() for o in out), (x, y))
    for a, b in zip((*out, *out_g), (*ref, *ref_g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_one_direction_only(direction: str) -> None:
    torch.manual_seed(1)
    x, y, xm, ym = _case(3, 4, 5, 6, 4)
    want = 0 if direction == "i2t" else 1
    out = late_interaction_chunked(x, y, xm, ym, memory_mb=1e-4, directions=direction)
    ref = late_interaction(x, y, xm, ym)
    torch.testing.assert_close(out[want], ref[want])
    assert torch.all(out[1 - want] == 0)  # not computed
    g = torch.autograd.grad(out[want].sum(), (x, y))
    rg = torch.autograd.grad(ref[want].sum(), (x, y))
    torch.testing.assert_close(g[0], rg[0])
    torch.testing.assert_close(g[1], rg[1])


def test_gradcheck() -> None:
    torch.manual_seed(2)
    x, y, xm, ym = _case(2, 3, 3, 4, 3)
    assert torch.autograd.gradcheck(lambda a, b: late_interaction_chunked(a, b, xm, ym, memory_mb=1e-5), (x, y))


def test_block_sizes_respect_the_budget() -> None:
    for b_i, b_t, mb in [(256, 256, 256.0), (256, 2048, 64.0), (4, 4, 1e-6), (1000, 10, 1.0)]:
        ci, ct = block_sizes(b_i, b_t, 50, 77, 4, mb)
        assert 1 <= ci <= b_i and 1 <= ct <= b_t
        assert ci * ct * 50 * 77 * 4 <= max(mb * 2**20, 50 * 77 * 4)


def test_a_sample_without_real_tokens_scores_zero_and_passes_no_gradient() -> None:
    """The mean over no token is 0 (the Triton kernel's contract too); the max over its padding is no similarity."""
    torch.manual_seed(2)
    x, y, xm, ym = _case(3, 4, 5, 6, 8)
    xm[1] = False  # image 1: all padding
    ym[2] = False  # text 2: all padding
    i2t, t2i = late_interaction_chunked(x, y, xm, ym, memory_mb=1e-4)
    for out in (i2t, t2i):
        assert torch.all(out[1] == 0) and torch.all(out[:, 2] == 0)
    ref_i2t, ref_t2i = late_interaction(x, y, xm, ym)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1] = False
    keep[:, 2] = False
    torch.testing.assert_close(i2t[keep], ref_i2t[keep])
    torch.testing.assert_close(t2i[keep], ref_t2i[keep])
    gx, gy = torch.autograd.grad(i2t.sum() + t2i.sum(), (x, y))
    assert torch.all(gx[1] == 0) and torch.all(gy[2] == 0)
    rgx, rgy = torch.autograd.grad((ref_i2t * keep).sum() + (ref_t2i * keep).sum(), (x, y))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gy, rgy)


def test_exact_at_batch_256_with_padding() -> None:
    """B = 256 at the real token counts (n1 = 50, 77 text slots, captions of 3..40 real tokens) against float64,
    the reference taken 32 images at a time (its rows are independent; the whole [256, 256, 50, 77] would be 2 GB)."""
    torch.manual_seed(256)
    b, n1, n2, d = 256, 50, 77, 16
    x = F.normalize(torch.randn(b, n1, d, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b, n2, d, dtype=torch.float64), dim=-1).requires_grad_()
    xm = torch.rand(b, n1) < 0.9
    xm[:, 0] = True
    ym = torch.arange(n2)[None, :] < torch.randint(3, 41, (b,))[:, None]
    ref = [torch.cat(parts) for parts in zip(*(late_interaction(x[i:i + 32], y, xm[i:i + 32], ym)
                                               for i in range(0, b, 32)))]
    out = late_interaction_chunked(x, y, xm, ym, memory_mb=16.0)  # several forward blocks and backward tiles
    g = [torch.randn(b, b, dtype=torch.float64) for _ in range(2)]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, g)), (x, y))
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, g)), (x, y))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
