"""The C++ backward of the CPU late interaction (models/csrc, built by scripts/env.sh) against the torch path.

Both compute the same routed sums; they may differ in the last bits (different summation order), and each is
bitwise repeatable. The float64 reference of the whole function is tested in test_chunked_similarity.py (with the op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.late_interaction_blocked as blocked
from models.cpu_ops import LIBRARY, late_interaction_backward
from models.interaction import late_interaction_chunked


def test_the_op_is_built_by_the_environment() -> None:
    assert LIBRARY.is_file(), f"{LIBRARY} missing: scripts/env.sh builds it"
    assert late_interaction_backward() is not None


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
