"""The C++ forward and backward of the CPU late interaction (models/csrc, built by scripts/env.sh) against the
torch path.

Both compute the same maxima, winners and routed sums; the values may differ in the last bits (different GEMM
blocking and summation order), the winners not at all where no two similarities tie within rounding, and each is
bitwise repeatable. The float64 reference of the whole function is tested in test_chunked_similarity.py (with the
ops).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.late_interaction_blocked as blocked
from models.cpu_ops import LIBRARY, late_interaction_backward, late_interaction_forward
from models.interaction import late_interaction_chunked


def test_the_op_is_built_by_the_environment() -> None:
    assert LIBRARY.is_file(), f"{LIBRARY} missing: scripts/env.sh builds it"
    assert late_interaction_backward() is not None
    assert late_interaction_forward() is not None


def _case(b_i: int, b_t: int, n1: int, n2: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b_i, n1, d, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(b_t, n2, d, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    xm = torch.rand(b_i, n1, generator=g) < 0.8
    xm[:, 0] = True
    ym = torch.arange(n2)[None, :] < torch.randint(1, n2 + 1, (b_t,), generator=g)[:, None]
    ym[-1] = False  # a text without a real token: no gradient from it
    return x, y, xm, ym


def _grads(x, y, xm, ym, directions: str, memory_mb: float = 256.0):
    out = late_interaction_chunked(x, y, xm, ym, memory_mb=memory_mb, directions=directions)
    g = torch.Generator().manual_seed(9)
    w = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    wanted = [o * wi for o, wi, on in zip(out, w, (directions != "t2i", directions != "i2t")) if on]
    return torch.autograd.grad(sum(t.sum() for t in wanted), (x, y))


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 9, 50, 77, 40), (3, 2, 5, 6, 100)])  # d not a multiple of a vector
def test_op_equals_the_torch_path(shape, dtype, directions, monkeypatch) -> None:
    x, y, xm, ym = _case(*shape, dtype=dtype, seed=sum(shape))
    with_op = _grads(x, y, xm, ym, directions, memory_mb=0.05)
    assert torch.equal(with_op[0], _grads(x, y, xm, ym, directions, memory_mb=0.05)[0])  # repeatable to the bit
    monkeypatch.setattr(blocked, "late_interaction_backward", lambda: None)
    monkeypatch.setattr(blocked, "late_interaction_forward", lambda: None)
    torch_path = _grads(x, y, xm, ym, directions, memory_mb=0.05)
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    for a, b in zip(with_op, torch_path):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **tol)


def test_only_the_gradient_asked_for(monkeypatch) -> None:
    x, y, xm, ym = _case(4, 5, 6, 7, 8, torch.float64, seed=1)
    y = y.detach()  # the gathered side of a frozen tower, say
    out = late_interaction_chunked(x, y, xm, ym)
    (gx,) = torch.autograd.grad(out[0].sum() + out[1].sum(), (x,))
    monkeypatch.setattr(blocked, "late_interaction_backward", lambda: None)
    out = late_interaction_chunked(x, y, xm, ym)
    (ref,) = torch.autograd.grad(out[0].sum() + out[1].sum(), (x,))
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-13)


def _weights(xm: torch.Tensor, ym: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (xm.to(dtype) / xm.sum(-1).clamp_min(1)[:, None], ym.to(dtype) / ym.sum(-1).clamp_min(1)[:, None])


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# texts not a multiple of a tile (8), fewer than a vector, one token a side, d not a multiple of a vector
@pytest.mark.parametrize("shape", [(7, 19, 50, 77, 40), (3, 2, 5, 6, 100), (9, 11, 1, 1, 16), (2, 5, 66, 3, 8)])
def test_forward_op_equals_the_torch_forward(shape, dtype, directions, monkeypatch) -> None:
    x, y, xm, ym = _case(*shape, dtype=dtype, seed=sum(shape))
    x, y = x.detach(), y.detach()
    xm[0] = False  # an image without a real token as well
    wx, wy = _weights(xm, ym, dtype)
    want = (directions != "t2i", directions != "i2t")
    monkeypatch.setattr(blocked, "FORWARD_TILE_BYTES", 4096)  # several image tiles, most of one image
    tile = blocked.forward_tile(*shape[:4], x.element_size())
    op = late_interaction_forward()
    got = op(x, y, xm, ym, wx, wy, *tile, *want, True)
    assert torch.equal(got[0], op(x, y, xm, ym, wx, wy, *tile, *want, True)[0])  # repeatable to the bit
    ref = blocked._forward_blocks(x, y, xm, ym, wx, wy, 2, 3, *want, True)
    valid = (xm.any(1)[:, None] & ym.any(1)[None, :]).to(dtype)
    tol = {"rtol": 1e-12, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b, on in zip(got[:2], ref[:2], want):
        if on:
            assert a.abs().sum() > 0
            torch.testing.assert_close(a * valid, b * valid, **tol)
    if dtype == torch.float64:  # no ties within rounding in random float64 tokens: the same winners
        # Winners that carry a gradient: of a real token, in a pair of real samples (a padded token's weight is 0)
        used = (valid.bool()[:, None, :] & xm[:, :, None], valid.bool()[:, None, :] & ym.t()[None, :, :])
        for a, b, on, where in zip(got[2:], ref[2:], want, used):
            assert a.numel() == (b.numel() if on else 0)
            if on:
                assert torch.equal(a[where], b[where])


def test_forward_op_ties_go_to_the_first_token_and_winners_are_kept_only_when_asked() -> None:
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(10, 9, 8, generator=g, dtype=torch.float64), dim=-1)
    y[:, 7] = y[:, 2]  # text token 7 ties with 2 everywhere, image token 5 with 1
    x[:, 5] = x[:, 1]
    xm, ym = torch.ones(4, 6, dtype=torch.bool), torch.ones(10, 9, dtype=torch.bool)
    ym[:, 0] = False  # a padded token before the winners: never a winner
    wx, wy = _weights(xm, ym, torch.float64)
    _, _, arg_r, arg_k = late_interaction_forward()(x, y, xm, ym, wx, wy, 1, 8, True, True, True)
    s = torch.einsum("ikd,jrd->ikjr", x, y).masked_fill(~ym[None, None], float("-inf"))
    assert torch.equal(arg_r.long(), s.argmax(-1))  # torch's argmax: the first maximum
    assert torch.equal(arg_k[:, 1:].long(), s.argmax(1).permute(0, 2, 1)[:, 1:])  # of the real text tokens
    assert (arg_r != 7).all() and (arg_k != 5).all()
    i2t, t2i, arg_r, arg_k = late_interaction_forward()(x, y, xm, ym, wx, wy, 1, 8, True, True, False)
    assert arg_r.numel() == 0 and arg_k.numel() == 0
    torch.testing.assert_close(i2t, (s.amax(-1) * wx[:, :, None]).sum(1), rtol=1e-12, atol=1e-13)


def test_forward_op_does_not_depend_on_the_thread_count() -> None:
    x, y, xm, ym = _case(16, 21, 50, 33, 64, torch.float32, seed=5)
    x, y = x.detach(), y.detach()
    wx, wy = _weights(xm, ym, torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(late_interaction_forward()(x, y, xm, ym, wx, wy, 2, 8, True, True, True))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))
