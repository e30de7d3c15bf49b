"""FILIP late interaction on the CPU at about the cost of its one matrix product, forward and backward.

Shapes: x [B_i, n1, d] image tokens, y [B_t, n2, d] text tokens, masks [B_i, n1] / [B_t, n2] (True = real).

Forward. With the C++ op built (models/cpu_ops.py; fp32 and fp64) the product is cut into tiles of a few images x
8 texts whose similarity block (~1 MB) stays in a core's L2: a single-threaded GEMM writes it, both maxima and their
winners are read from it there, and the tiles run in parallel. The full [B_i n1, B_t n2] product never reaches
memory, so the whole forward costs about what the one matmul of the same shapes costs (which mostly writes it).
Otherwise (bf16, or the op not built) in torch, per block of ci images x ct texts, one matmul and one read of its
output per direction:
  * the text tokens enter the product in (token, text) order, so the block comes out as S[i, k, r, j]
    ([ci * n1, n2 * ct], j fastest). Both maxima are then over a non-innermost axis (r for image->text, k for
    text->image) and run as channels-last max pooling, which vectorises over the contiguous axis and returns the
    argmax with the value.
  * padding is folded into the product: x gains a column of ones against y's column of penalties (and the other way
    round), so a padded token's similarities are very negative without a masked_fill over the block.
Either way what autograd keeps is the winners: int16 [B_i, n1, B_t] (best text token per image token and text) and
int16 [B_i, n2, B_t] (best image token per text token and image), ~40x less than the block in fp32; ties go to the
first token. (Winners of padded tokens carry no gradient and may differ between the two paths.)

Backward routes instead of multiplying: the gradient of s^I(i, j) reaches only the pairs (x_ik, y_jr*) that won,
so d s / d x and d s / d y are sums of B_i B_t (n1 + n2) gathered rows (FILIP's "cheap backward"). With the C++ op
built (models/cpu_ops.py) one pass per side computes them; otherwise, in torch, each sum is one `embedding_bag`
(a weighted gather-sum of table rows) over bags of winners, and the two sums that scatter (into the winner's row)
first group their entries with one stable sort of small int16 keys. No [.., n1, n2] block is built either way.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.cpu_ops import late_interaction_backward, late_interaction_forward

INT16_MAX = torch.iinfo(torch.int16).max
TILE_BYTES = 1 << 21  # token rows of each side per backward tile (measured best on a 2 MB L2)
FORWARD_TILE_BYTES = 1 << 20  # the C++ forward's similarity tile, kept in L2 while both maxima read it
FORWARD_TILE_TEXTS = 8  # texts per C++ forward tile: the image->text max runs along them in one or two vectors


def forward_tile(b_i: int, b_t: int, n1: int, n2: int, elem_bytes: int) -> tuple[int, int]:
    """(images, texts) per tile of the C++ forward: its [ci n1, n2 ct] similarity fits FORWARD_TILE_BYTES."""
    ct = min(b_t, FORWARD_TILE_TEXTS)
    return max(1, min(b_i, FORWARD_TILE_BYTES // (n1 * n2 * ct * elem_bytes))), ct


def _max_over_middle(s: Tensor, n: int, h: int, c: int, with_index: bool = True) -> tuple[Tensor, Tensor | None]:
    """Max and argmax over h of a contiguous [n, h, c] tensor -> ([n, c], [n, c] int64 or None).

    Channels-last max pooling with an (h, 1) window is exactly this reduction, vectorised along c."""
    pooled = F.max_pool2d(s.view(n, h, 1, c).permute(0, 3, 1, 2), (h, 1), return_indices=with_index)
    if not with_index:
        return pooled.reshape(n, c), None
    return pooled[0].reshape(n, c), pooled[1].reshape(n, c)


def _penalty(dtype: torch.dtype) -> float:
    # Far below any similarity of unit tokens, and twice of it still finite (a pair padded on both sides).
    return torch.finfo(dtype).min / 4


def fold_masks(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor, mask_text: bool, mask_image: bool) -> tuple[Tensor, Tensor]:
    """x [B_i, n1, d], y [B_t, n2, d] -> (x', y') with <x'_k, y'_r> = <x_k, y_r> + (penalty if r or k is padded).

    mask_text: penalise padded text tokens (the image->text max runs over them); mask_image: padded image tokens."""
    xc, yc = [x], [y]
    pen = _penalty(x.dtype)
    if mask_text:
        xc.append(x.new_ones(*x.shape[:2], 1))
        yc.append(((~ym).to(y.dtype) * pen)[..., None])
    if mask_image:
        xc.append(((~xm).to(x.dtype) * pen)[..., None])
        yc.append(y.new_ones(*y.shape[:2], 1))
    if len(xc) == 1:
        return x, y
    return torch.cat(xc, -1), torch.cat(yc, -1)


def routed_sum(index: Tensor, table: Tensor, bag: int, weights: Tensor) -> Tensor:
    """out[b] = sum over the b-th `bag` entries e of weights[e] * table[index[e]] -> [len(index) // bag, d]."""
    offsets = torch.arange(0, index.numel(), bag, device=index.device, dtype=index.dtype)
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


def scattered_sum(keys: Tensor, n_keys: int, table: Tensor, weights: Tensor,
                  row_of: Callable[[Tensor], Tensor]) -> Tensor:
    """out[q] = sum over entries e with keys[e] = q of weights[e] * table[row_of(e)] -> [n_keys, d].

    keys: int16 (n_keys <= 2^15). Grouped by one stable sort of the keys (int16 is the fast path of torch's sort),
    then one gather-sum per group; within a group the entries keep their order, so the sum is deterministic."""
    ordered, order = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(ordered, torch.arange(n_keys, device=keys.device, dtype=keys.dtype))
    return F.embedding_bag(row_of(order), table, offsets, mode="sum", per_sample_weights=weights[order])


def _route_i2t(arg_r: Tensor, g: Tensor, wx: Tensor, xs: Tensor, ys: Tensor, gx: Tensor, gy: Tensor) -> None:
    """One tile of s^I's backward. arg_r [ci, n1, ct]: the text token that won for image token k and text j;
    g [ci, ct] the output's gradient, wx [ci, n1] the image tokens' weights; xs [ci*n1, d], ys [ct*n2, d] the tile's
    token rows; gx, gy their gradient rows (added to)."""
    ci, n1, ct = arg_r.shape
    n2 = ys.shape[0] // ct
    c = (g[:, None, :] * wx[:, :, None]).view(-1)  # d s^I(i, j) / d <x_ik, y_jr*>, entries in (i, k, j) order
    key = (torch.arange(ct, device=arg_r.device, dtype=torch.int16) * n2 + arg_r).view(-1)  # -> row j * n2 + r*
    gx += routed_sum(key.int(), ys, ct, c)  # bag (i, k): its winner in every text of the tile
    gy += scattered_sum(key, ct * n2, xs, c, lambda e: e // ct)  # entry (i, k, j) comes from row i * n1 + k


def _route_t2i(arg_k: Tensor, g: Tensor, wy: Tensor, xs: Tensor, ys: Tensor, gx: Tensor, gy: Tensor) -> None:
    """One tile of s^T's backward. arg_k [ci, n2, ct]: the image token that won for text token r and image i;
    g [ci, ct], wy [ct, n2] the text tokens' weights."""
    ci, n2, ct = arg_k.shape
    n1 = xs.shape[0] // ci
    # bag (j, r): its winner in every image of the tile, so the entries in (j, r, i) order
    c = g.t()[:, None, :] * wy[:, :, None]  # [ct, n2, ci] d s^T(i, j) / d <x_ik*, y_jr>
    key = torch.arange(ci, device=arg_k.device, dtype=torch.int16) * n1 + arg_k.permute(2, 1, 0)  # -> row i * n1 + k*
    key, c = key.reshape(-1), c.view(-1)
    gy += routed_sum(key.int(), xs, ci, c)
    gx += scattered_sum(key, ci * n1, ys, c, lambda e: e // ci)  # entry (j, r, i) comes from row j * n2 + r


def _forward_blocks(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor, wx: Tensor, wy: Tensor, ci: int, ct: int,
                    want_i2t: bool, want_t2i: bool, keep_winners: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward in torch, blocks of ci images x ct texts (see the module docstring) -> i2t, t2i, arg_r, arg_k."""
    b_i, n1, _ = x.shape
    b_t, n2, _ = y.shape
    acc = wx.dtype
    xa, ya = fold_masks(x, y, xm, ym, want_i2t and not bool(ym.all()), want_t2i and not bool(xm.all()))
    da = xa.shape[-1]
    xa = xa.reshape(b_i * n1, da)
    ya = ya.transpose(0, 1).contiguous()  # [n2, B_t, da]: (token, text) order, see the module docstring
    i2t = torch.zeros(b_i, b_t, dtype=acc, device=x.device)
    t2i = torch.zeros(b_i, b_t, dtype=acc, device=x.device)
    # Without a gradient to come (evaluation) the winners are not kept.
    arg_r = torch.empty(b_i, n1, b_t if want_i2t and keep_winners else 0, dtype=torch.int16, device=x.device)  # (i, k, j)
    arg_k = torch.empty(b_i, n2, b_t if want_t2i and keep_winners else 0, dtype=torch.int16, device=x.device)  # (i, r, j)
    for i0 in range(0, b_i, ci):
        i1 = min(i0 + ci, b_i)
        xs = xa[i0 * n1 : i1 * n1]
        for j0 in range(0, b_t, ct):
            j1 = min(j0 + ct, b_t)
            nb = j1 - j0
            s = xs @ ya[:, j0:j1].reshape(n2 * nb, da).t()  # [ci*n1, n2*nb] = S[i, k, r, j]
            if want_i2t:  # best text token r per (image token k, text j)
                best, arg = _max_over_middle(s, (i1 - i0) * n1, n2, nb, keep_winners)  # [ci*n1, nb]
                if keep_winners:
                    arg_r[i0:i1, :, j0:j1] = arg.view(i1 - i0, n1, nb)
                i2t[i0:i1, j0:j1] = torch.bmm(wx[i0:i1, None, :], best.view(i1 - i0, n1, nb).to(acc))[:, 0]
            if want_t2i:  # best image token k per (text token r, text j)
                best, arg = _max_over_middle(s, i1 - i0, n1, n2 * nb, keep_winners)  # [ci, n2*nb]
                if keep_winners:
                    arg_k[i0:i1, :, j0:j1] = arg.view(i1 - i0, n2, nb)
                t2i[i0:i1, j0:j1] = (best.view(i1 - i0, n2, nb).to(acc) * wy[j0:j1].t()[None]).sum(1)
    return i2t, t2i, arg_r, arg_k


class BlockedLateInteraction(torch.autograd.Function):
    """(x, y, xm, ym, ci, ct, want_i2t, want_t2i) -> (i2t [B_i, B_t], t2i [B_i, B_t]); see the module docstring."""

    @staticmethod
    def forward(ctx, x, y, xm, ym, ci: int, ct: int, want_i2t: bool, want_t2i: bool,  # type: ignore[override]
                keep_winners: bool = True):
        b_i, n1, d = x.shape
        b_t, n2, _ = y.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # means accumulate in at least fp32
        wx = xm.to(acc) / xm.sum(-1).clamp_min(1)[:, None]  # [B_i, n1] weight of token k in s^I(i, .)
        wy = ym.to(acc) / ym.sum(-1).clamp_min(1)[:, None]  # [B_t, n2] weight of token r in s^T(., j)
        op = late_interaction_forward() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) else None
        if op is not None:  # the C++ forward: each tile reduced while in cache, the product never in memory
            i2t, t2i, arg_r, arg_k = op(x, y, xm, ym, wx, wy, *forward_tile(b_i, b_t, n1, n2, x.element_size()),
                                        want_i2t, want_t2i, keep_winners)
        else:
            i2t, t2i, arg_r, arg_k = _forward_blocks(x, y, xm, ym, wx, wy, ci, ct, want_i2t, want_t2i, keep_winners)
        # A sample with no real token scores 0 against everything (the mean over no token) and passes no gradient,
        # as in the Triton kernel: the max over its padding is not a similarity.
        valid = (xm.any(1)[:, None] & ym.any(1)[None, :]).to(acc)  # [B_i, B_t]
        i2t *= valid
        t2i *= valid
        ctx.save_for_backward(x, y, wx, wy, arg_r, arg_k, valid)
        ctx.blocks = (ci, ct)
        ctx.want = (want_i2t, want_t2i)
        i2t, t2i = i2t.to(x.dtype), t2i.to(x.dtype)
        ctx.mark_non_differentiable(*[o for o, w in ((i2t, want_i2t), (t2i, want_t2i)) if not w])
        return i2t, t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):  # type: ignore[override]
        x, y, wx, wy, arg_r, arg_k, valid = ctx.saved_tensors
        want_i2t, want_t2i = ctx.want
        b_i, n1, d = x.shape
        b_t, n2, _ = y.shape
        # Gathered in fp32 whatever the forward ran in: the sums are short, their inputs exact.
        xt = x.reshape(b_i * n1, d).float() if x.dtype != torch.float64 else x.reshape(b_i * n1, d)
        yt = y.reshape(b_t * n2, d).to(xt.dtype)
        wx, wy, valid = wx.to(xt.dtype), wy.to(xt.dtype), valid.to(xt.dtype)
        route_i2t = want_i2t and g_i2t is not None
        route_t2i = want_t2i and g_t2i is not None
        g_i2t = g_i2t.to(xt.dtype) * valid if route_i2t else None
        g_t2i = g_t2i.to(xt.dtype) * valid if route_t2i else None
        op = late_interaction_backward() if x.device.type == "cpu" else None  # the C++ ops are CPU-only
        if op is not None:  # the same sums in one C++ pass per side: no sort, no per-tile torch calls
            gx, gy = op(xt.view(b_i, n1, d), yt.view(b_t, n2, d), wx, wy, arg_r, arg_k, g_i2t, g_t2i,
                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            return (gx.to(x.dtype) if ctx.needs_input_grad[0] else None,
                    gy.to(y.dtype) if ctx.needs_input_grad[1] else None, None, None, None, None, None, None, None)
        gx = torch.zeros(b_i * n1, d, dtype=xt.dtype, device=x.device)
        gy = torch.zeros(b_t * n2, d, dtype=xt.dtype, device=x.device)
        # Tiles of images x texts whose token rows (the gathered tables) stay in a core's L2 cache together, and no
        # larger than the forward's blocks: a tile's index work (~30 bytes per winner) then fits the same budget.
        fi, ft = ctx.blocks
        ci = max(1, min(fi, TILE_BYTES // (n1 * d * xt.element_size()), INT16_MAX // n1))
        ct = max(1, min(ft, TILE_BYTES // (n2 * d * xt.element_size()), INT16_MAX // n2))
        for i0 in range(0, b_i, ci):
            i1 = min(i0 + ci, b_i)
            xs, gxs = xt[i0 * n1 : i1 * n1], gx[i0 * n1 : i1 * n1]
            for j0 in range(0, b_t, ct):
                j1 = min(j0 + ct, b_t)
                ys, gys = yt[j0 * n2 : j1 * n2], gy[j0 * n2 : j1 * n2]
                if route_i2t:
                    _route_i2t(arg_r[i0:i1, :, j0:j1], g_i2t[i0:i1, j0:j1], wx[i0:i1], xs, ys, gxs, gys)
                if route_t2i:
                    _route_t2i(arg_k[i0:i1, :, j0:j1], g_t2i[i0:i1, j0:j1], wy[j0:j1], xs, ys, gxs, gys)
        return (gx.view(b_i, n1, d).to(x.dtype), gy.view(b_t, n2, d).to(y.dtype), None, None, None, None, None, None,
                None)
