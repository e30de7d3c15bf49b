"""FILIP late interaction as Triton kernels: a fused forward and a routed backward (GPU; CPU via the interpreter).

Same contract as `models.interaction.late_interaction` (the float64 reference):
    x [B_i, n1, d], y [B_t, n2, d] unit-norm tokens; xm [B_i, n1], ym [B_t, n2] bool, True = a real token
    i2t[i, j] = mean over real k of  max over real r of <x_ik, y_jr>
    t2i[i, j] = mean over real r of  max over real k of <x_ik, y_jr>
A direction not asked for comes back as zeros without a gradient. A sample with no real token gets 0 in both
directions against every partner (the mean over no token, count clamped to 1; the max over no token is not taken).

Forward (`_forward_kernel`): one program per (image i, block of BLOCK_J texts). For each text it builds the
[n1, n2] tile of dot products in registers (tl.dot over d in chunks, fp32 accumulation), takes both masked
maxima from that one tile, averages them and stores two scalars plus the winners' indices; the
[B_i, B_t, n1, n2] tensor never exists in memory. What autograd keeps is x, y and the indices
R [B_i, B_t, n1] (best text token per image token) and K [B_i, B_t, n2] (best image token per text token),
int16 (int32 beyond 32767 tokens), -1 where the token is padding or the partner has no real token.

Backward (`_route_kernel`): the gradient of a max is the gradient routed to its winner, so with a = dL/di2t,
b = dL/dt2i, wx = xm / n_x, wy = ym / n_y:
    gx[i, k] = wx[i, k] * sum_j a[i, j] y[j, R[i, j, k]]                  (i2t: a gather, one term per text)
             + sum_{(j, r): K[i, j, r] = k} b[i, j] wy[j, r] y[j, r]      (t2i: a scatter, inverted into a segment)
    gy[j, r] = wy[j, r] * sum_i b[i, j] x[i, K[i, j, r]]                  (t2i: a gather, one term per image)
             + sum_{(i, k): R[i, j, k] = r} a[i, j] wx[i, k] x[i, k]      (i2t: a scatter, inverted into a segment)
One program per output token row (and d-chunk) sums both parts in fp32 registers and writes its row once: no
atomics, no dense coefficient block, and a fixed summation order (a rerun gives the same bits).
The scatters are inverted by a stable sort of the indices per sample (torch.sort, in chunks bounded by
`segment_mb`), giving for every token the list of partner tokens whose max it won (CSR segments).

Triton is imported here only: callers import this module lazily (on CUDA, when triton is importable), so models/
and the CLI load without it. CPU tensors work only when TRITON_INTERPRET=1 was set before this module was
imported (Triton 3.8 reads it when `@triton.jit` decorates a kernel, not when triton itself is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes. Defaults chosen from ptxas's register report for sm_90 (no spills), not from GPU timings:
    benchmarks/similarity_gpu.py --tune times alternatives on a device."""

    block_j: int = 8  # texts per forward program (B_t need not divide by it)
    forward_block_d: int = 64  # d-chunk of each tl.dot (a power of two >= 16)
    forward_warps: int = 8  # 4 warps spill the [64, 128] fp32 tile and its argmax at n1 = 50, n2 = 77
    route_block_p: int = 16  # partner rows gathered per step in the backward
    route_block_d: int = 256  # d-chunk per backward program (a power of two; capped at d's)
    route_warps: int = 4


# Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import): then they run on CPU tensors.
INTERPRETED = False  # set below, after the kernels are defined


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr,  # x [B_i, n1, d], y [B_t, n2, d], contiguous, same dtype
    xm_ptr, ym_ptr,  # [B_i, n1], [B_t, n2] int8, 1 = real token
    i2t_ptr, t2i_ptr,  # [B_i, B_t] in the input dtype
    r_ptr, k_ptr,  # R [B_i, B_t, n1], K [B_i, B_t, n2] int16/int32 winners (or 1-element dummies)
    B_T, N1, N2, D,
    N1P: tl.constexpr, N2P: tl.constexpr,  # token counts padded to powers of two (tl.arange / tl.dot need them)
    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    WANT_I2T: tl.constexpr, WANT_T2I: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584)
):
    i = tl.program_id(0).to(tl.int64)
    j_first = tl.program_id(1) * BLOCK_J
    k = tl.arange(0, N1P)  # image token ids, [N1P]
    r = tl.arange(0, N2P)  # text token ids, [N2P]
    dd = tl.arange(0, BLOCK_D)
    k_in = k < N1
    r_in = r < N2
    xm = tl.load(xm_ptr + i * N1 + k, mask=k_in, other=0) != 0  # [N1P] real image tokens (pad tiles: False)
    n_x = tl.sum(xm.to(tl.int32), axis=0)
    x_base = x_ptr + i * N1 * D
    for jj in range(BLOCK_J):
        j = (j_first + jj).to(tl.int64)
        if j < B_T:  # the last block of texts may be short: B_t need not divide by BLOCK_J
            ym = tl.load(ym_ptr + j * N2 + r, mask=r_in, other=0) != 0  # [N2P]
            n_y = tl.sum(ym.to(tl.int32), axis=0)
            y_base = y_ptr + j * N2 * D
            # s[k, r] = <x_ik, y_jr>, [N1P, N2P] fp32, accumulated over d in BLOCK_D chunks on the tensor cores.
            s = tl.zeros((N1P, N2P), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_in = (d0 + dd) < D
                xt = tl.load(x_base + k[:, None] * D + d0 + dd[None, :], mask=k_in[:, None] & d_in[None, :], other=0.0)
                yt = tl.load(y_base + r[:, None] * D + d0 + dd[None, :], mask=r_in[:, None] & d_in[None, :], other=0.0)
                if DOT_FP32:
                    xt = xt.to(tl.float32)
                    yt = yt.to(tl.float32)
                s = tl.dot(xt, tl.trans(yt), s, input_precision=PRECISION)  # [N1P, BD] @ [BD, N2P]
            pair = i * B_T + j
            if WANT_I2T:
                # Each image token's best real text token: padding (and pad columns) can never win.
                best_r, win_r = tl.max(tl.where(ym[None, :], s, float("-inf")), axis=1, return_indices=True)  # [N1P]
                live_r = xm & (n_y > 0)  # the token counts in the mean, and a winner exists
                total = tl.sum(tl.where(live_r, best_r, 0.0), axis=0)
                tl.store(i2t_ptr + pair, (total / tl.maximum(n_x, 1).to(tl.float32)).to(i2t_ptr.dtype.element_ty))
                tl.store(r_ptr + pair * N1 + k, tl.where(live_r, win_r, -1).to(r_ptr.dtype.element_ty), mask=k_in)
            if WANT_T2I:
                # Each text token's best real image token, from the same tile.
                best_k, win_k = tl.max(tl.where(xm[:, None], s, float("-inf")), axis=0, return_indices=True)  # [N2P]
                live_k = ym & (n_x > 0)
                total = tl.sum(tl.where(live_k, best_k, 0.0), axis=0)
                tl.store(t2i_ptr + pair, (total / tl.maximum(n_y, 1).to(tl.float32)).to(t2i_ptr.dtype.element_ty))
                tl.store(k_ptr + pair * N2 + r, tl.where(live_k, win_k, -1).to(k_ptr.dtype.element_ty), mask=r_in)


@triton.jit
def _route_kernel(
    out_ptr,  # [B_own, n_own, d]: the gradient of one side's tokens, each row written once
    other_ptr,  # [B_other, n_other, d]: the other side's tokens, contiguous
    w_own_ptr,  # [B_own * n_own] fp32: mask / count of the own side (weight of the gathered part)
    w_other_ptr,  # [B_other * n_other] fp32: mask / count of the other side (weight of the segment part)
    g_dense_ptr, g_dense_s, g_dense_p,  # output gradient of the gathered direction, element [s, p] at s*gs + p*gp
    idx_ptr, idx_s, idx_p,  # winners in the other sample for each own token: [s, p, t] at s*is + p*ip + t
    g_seg_ptr, g_seg_s, g_seg_p,  # output gradient of the scattered direction, [s, p]
    seg_start_ptr, seg_end_ptr, seg_ptr,  # per own row of this chunk: [start, end) into seg = flat other tokens
    row0,  # first own row (s * n_own + t) of this chunk
    B_OTHER, N_OWN, N_OTHER, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DENSE: tl.constexpr, SEGMENT: tl.constexpr,
):
    local = tl.program_id(0)
    row = row0 + local.to(tl.int64)  # own token (s, t) flattened
    s = row // N_OWN
    t = row % N_OWN
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = dd < D
    lane = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if DENSE:
        # This token won nothing, it took a max: gather, from every partner p, the row of the partner's token
        # that won this token's max, weighted by that pair's output gradient. [BLOCK_P, BLOCK_D] per step.
        w = tl.load(w_own_ptr + row)
        if w != 0:  # padding has weight 0 and no winners (-1): skip it
            gathered = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for p0 in range(0, B_OTHER, BLOCK_P):
                p = (p0 + lane).to(tl.int64)
                p_in = p < B_OTHER
                q = tl.load(idx_ptr + s * idx_s + p * idx_p + t, mask=p_in, other=-1).to(tl.int64)
                live = q >= 0
                g = tl.load(g_dense_ptr + s * g_dense_s + p * g_dense_p, mask=live, other=0.0)
                rows = tl.load(other_ptr + (p * N_OTHER + q)[:, None] * D + dd[None, :],
                               mask=live[:, None] & d_in[None, :], other=0.0)
                gathered += tl.sum(g[:, None] * rows.to(tl.float32), axis=0)
            acc += w * gathered
    if SEGMENT:
        # The other direction: partner tokens whose max this token won (its CSR segment), each with weight
        # g[s, p] * w_other[p, q], summed in sorted (deterministic) order.
        e0 = tl.load(seg_start_ptr + local)
        e1 = tl.load(seg_end_ptr + local)
        for e in range(e0, e1, BLOCK_P):
            ee = e + lane
            e_in = ee < e1
            flat = tl.load(seg_ptr + ee, mask=e_in, other=0).to(tl.int64)  # p * N_OTHER + q
            p = flat // N_OTHER
            c = tl.load(g_seg_ptr + s * g_seg_s + p * g_seg_p, mask=e_in, other=0.0) \
                * tl.load(w_other_ptr + flat, mask=e_in, other=0.0)
            rows = tl.load(other_ptr + flat[:, None] * D + dd[None, :], mask=e_in[:, None] & d_in[None, :], other=0.0)
            acc += tl.sum(c[:, None] * rows.to(tl.float32), axis=0)
    tl.store(out_ptr + row * D + dd, acc.to(out_ptr.dtype.element_ty), mask=d_in)


INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, least: int = 16) -> int:
    """Next power of two >= n, at least `least` (tl.dot wants every dimension >= 16)."""
    return max(least, triton.next_power_of_2(n))


def _segments(winners: Tensor, n_own: int) -> tuple[Tensor, Tensor, Tensor]:
    """Invert a scatter: for own samples s (rows of `winners` [c, L]: winners[s, e] = the own token that won the max
    of flat other token e, or -1), the flat other tokens grouped by the own token that won them.

    Returns seg_start, seg_end [c * n_own] int32 (token (s, t) owns seg[start:end]) and seg [c * L] int32.
    A stable sort keeps each segment in increasing other-token order, so the backward sums in a fixed order.
    """
    c, length = winners.shape
    keys, order = torch.sort(winners, dim=1, stable=True)  # -1 (no winner) sorts first and is in no segment
    keys = keys.contiguous()
    edges = torch.arange(n_own + 1, device=winners.device, dtype=keys.dtype).expand(c, n_own + 1).contiguous()
    bounds = torch.searchsorted(keys, edges).to(torch.int64)  # [c, n_own + 1]: where token t's entries begin
    bounds += torch.arange(c, device=winners.device, dtype=torch.int64)[:, None] * length
    start = bounds[:, :-1].reshape(-1).to(torch.int32)
    end = bounds[:, 1:].reshape(-1).to(torch.int32)
    return start, end, order.reshape(-1).to(torch.int32)


def _route(own: Tensor, other: Tensor, w_own: Tensor, w_other: Tensor,
           dense: tuple[Tensor, Tensor] | None, segment: tuple[Tensor, Tensor] | None, segment_mb: float,
           config: KernelConfig) -> Tensor:
    """Gradient of one side's tokens [B_own, n_own, d].

    dense = (g [B_own, B_other] view, idx [B_own, B_other, n_own] view): the gathered direction.
    segment = (g [B_own, B_other] view, winners [B_other, B_own, n_other] view: own token that won each other
    token's max): the scattered direction. Either may be None (its direction not asked for or unused).
    """
    b_own, n_own, d = own.shape
    b_other, n_other, _ = other.shape
    out = torch.empty_like(own)
    if dense is None and segment is None or b_other == 0:
        return out.zero_()
    block_d = min(_pow2(d), config.route_block_d)
    zf = torch.zeros(1, device=own.device, dtype=torch.float32)
    zi = torch.zeros(1, device=own.device, dtype=torch.int32)
    g_d, idx = dense if dense is not None else (zf.view(1, 1), zi.view(1, 1, 1))
    g_s, winners = segment if segment is not None else (zf.view(1, 1), None)
    # Own samples per launch: the sort's transient memory (keys, int64 order, int32 copy) stays under segment_mb.
    per_sample = max(1, b_other * n_other * (2 * winners.element_size() + 8 + 4)) if winners is not None else 1
    chunk = b_own if winners is None else max(1, min(b_own, int(segment_mb * 2**20) // per_sample))
    for s0 in range(0, b_own, chunk):
        s1 = min(b_own, s0 + chunk)
        if winners is not None:
            # winners[p, s, q] -> [own sample s, flat other token p * n_other + q]
            start, end, seg = _segments(winners[:, s0:s1].permute(1, 0, 2).reshape(s1 - s0, b_other * n_other), n_own)
        else:
            start = end = seg = zi
        grid = ((s1 - s0) * n_own, triton.cdiv(d, block_d))
        _route_kernel[grid](
            out, other, w_own, w_other,
            g_d, g_d.stride(0), g_d.stride(1),
            idx, idx.stride(0), idx.stride(1),
            g_s, g_s.stride(0), g_s.stride(1),
            start, end, seg, s0 * n_own,
            b_other, n_own, n_other, d,
            BLOCK_P=config.route_block_p, BLOCK_D=block_d, DENSE=dense is not None, SEGMENT=segment is not None,
            num_warps=config.route_warps,
        )
    return out


class _TritonLateInteraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, xm: Tensor, ym: Tensor,  # type: ignore[override]
                want_i2t: bool, want_t2i: bool, config: KernelConfig, segment_mb: float) -> tuple[Tensor, Tensor]:
        b_i, n1, d = x.shape
        b_t, n2, _ = y.shape
        index_dtype = torch.int16 if max(n1, n2) <= torch.iinfo(torch.int16).max else torch.int32
        i2t = x.new_zeros(b_i, b_t)
        t2i = x.new_zeros(b_i, b_t)
        r_win = torch.empty(b_i, b_t, n1 if want_i2t else 0, dtype=index_dtype, device=x.device)
        k_win = torch.empty(b_i, b_t, n2 if want_t2i else 0, dtype=index_dtype, device=x.device)
        if b_i and b_t and (want_i2t or want_t2i):
            dummy = torch.empty(1, dtype=index_dtype, device=x.device)
            # fp32 inputs: IEEE products, not TF32, so the kernel matches the reference to fp32 rounding.
            precision = "ieee" if x.dtype == torch.float32 else "tf32"
            _forward_kernel[(b_i, triton.cdiv(b_t, config.block_j))](
                x, y, xm.to(torch.int8), ym.to(torch.int8), i2t, t2i,
                r_win if want_i2t else dummy, k_win if want_t2i else dummy,
                b_t, n1, n2, d,
                N1P=_pow2(n1), N2P=_pow2(n2), BLOCK_D=min(_pow2(d), config.forward_block_d), BLOCK_J=config.block_j,
                WANT_I2T=want_i2t, WANT_T2I=want_t2i, PRECISION=precision,
                DOT_FP32=INTERPRETED and x.dtype == torch.bfloat16,  # bf16 x bf16 products are exact in fp32 anyway
                num_warps=config.forward_warps,
            )
        # Weight of each token in its mean: [B_i, n1], [B_t, n2] fp32 (0 for padding).
        wx = xm.to(torch.float32) / xm.sum(-1, keepdim=True).clamp_min(1)
        wy = ym.to(torch.float32) / ym.sum(-1, keepdim=True).clamp_min(1)
        ctx.save_for_backward(x, y, wx, wy, r_win, k_win)
        ctx.want = (want_i2t, want_t2i)
        ctx.segment_mb = segment_mb
        ctx.config = config
        ctx.set_materialize_grads(False)  # an output nobody used gets None: its kernels are skipped
        ctx.mark_non_differentiable(*[o for o, w in ((i2t, want_i2t), (t2i, want_t2i)) if not w])
        return i2t, t2i

    @staticmethod
    def backward(ctx, g_i2t: Tensor | None, g_t2i: Tensor | None):  # type: ignore[override]
        x, y, wx, wy, r_win, k_win = ctx.saved_tensors
        want_i2t, want_t2i = ctx.want
        a = g_i2t.float().contiguous() if want_i2t and g_i2t is not None else None  # dL/di2t [B_i, B_t]
        b = g_t2i.float().contiguous() if want_t2i and g_t2i is not None else None  # dL/dt2i [B_i, B_t]
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = _route(x, y, wx.reshape(-1), wy.reshape(-1),
                        dense=(a, r_win) if a is not None else None,  # R[i, j, k]: own = image i, partner j
                        segment=(b, k_win.permute(1, 0, 2)) if b is not None else None,  # K as [j, i, r]
                        segment_mb=ctx.segment_mb, config=ctx.config)
        if ctx.needs_input_grad[1]:
            gy = _route(y, x, wy.reshape(-1), wx.reshape(-1),
                        dense=(b.t(), k_win.permute(1, 0, 2)) if b is not None else None,  # K as [j, i, r]
                        segment=(a.t(), r_win) if a is not None else None,  # R[i, j, k]: partner i, own j
                        segment_mb=ctx.segment_mb, config=ctx.config)
        return gx, gy, None, None, None, None, None, None


def late_interaction_triton(
    x: Tensor,  # [B_i, n1, d]
    y: Tensor,  # [B_t, n2, d]
    xm: Tensor | None = None,  # [B_i, n1] bool
    ym: Tensor | None = None,  # [B_t, n2] bool
    want_i2t: bool = True,
    want_t2i: bool = True,
    *,
    config: KernelConfig | None = None,
    segment_mb: float = 64.0,
) -> tuple[Tensor, Tensor]:
    """(i2t, t2i), each [B_i, B_t] in the inputs' dtype; see the module docstring for the contract and the kernels.

    config: launch shapes (KernelConfig()). segment_mb: bound on the backward's sort buffers (the per-token
    segment lists are built in chunks of samples that fit it).
    """
    if not x.is_cuda and not INTERPRETED:
        raise ValueError("late_interaction_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")
    b_i, n1, _ = x.shape
    b_t, n2, _ = y.shape
    if xm is None:
        xm = torch.ones(b_i, n1, dtype=torch.bool, device=x.device)
    if ym is None:
        ym = torch.ones(b_t, n2, dtype=torch.bool, device=y.device)
    dtype = torch.promote_types(x.dtype, y.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"late_interaction_triton takes fp32, fp16 or bf16 tokens, not {dtype}")
    # The casts sit outside the Function so that autograd returns each gradient in its input's own dtype.
    return _TritonLateInteraction.apply(x.to(dtype).contiguous(), y.to(dtype).contiguous(), xm.bool(), ym.bool(),
                                        bool(want_i2t), bool(want_t2i), config or KernelConfig(), float(segment_mb))
