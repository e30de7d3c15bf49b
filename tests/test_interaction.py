"""Late interaction, global similarity and the FILIP loss against plain-Python transcriptions of the paper.

The references below are written straight from the formulas (FILIP, Yao et al. 2022), with Python
loops over images, texts and tokens on Python floats, independently of models/:

    s^I(i, j) = 1/n1 * sum over real image tokens k of  max over real text tokens r  of <x_ik, y_jr>
    s^T(i, j) = 1/n2 * sum over real text tokens r  of  max over real image tokens k of <x_ik, y_jr>
    L = 1/2 [ CE over rows of s^I * scale + CE over columns of s^T * scale ], diagonal targets.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.filip import Features
from models.interaction import global_similarity, late_interaction, late_interaction_chunked
from models.loss import filip_loss

# Both implementations promise the same numbers; the loss uses the chunked one.
IMPLS = {
    "reference": late_interaction,
    "chunked": lambda x, y, xm, ym: late_interaction_chunked(x, y, xm, ym, memory_mb=1e-3),
}

SHAPES = [  # (B_i, B_t, n1, n2, d)
    (3, 4, 5, 7, 8),
    (1, 1, 1, 1, 3),
    (4, 2, 10, 12, 16),
    (5, 6, 3, 9, 4),
]


# ----------------------------------------------------------------------------- plain-Python references


def _dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b))


def loop_late_interaction(x, y, xm, ym) -> tuple[list[list[float]], list[list[float]]]:
    """s^I and s^T as nested lists [B_i][B_t], by loops over images, texts and tokens."""
    x, y, xm, ym = x.tolist(), y.tolist(), xm.tolist(), ym.tolist()
    s_i, s_t = [], []
    for i in range(len(x)):
        row_i, row_t = [], []
        img = [x[i][k] for k in range(len(x[i])) if xm[i][k]]  # real image tokens of image i
        for j in range(len(y)):
            txt = [y[j][r] for r in range(len(y[j])) if ym[j][r]]  # real text tokens of text j
            # image -> text: for each real image token, its best real text token; mean over image tokens
            row_i.append(sum(max(_dot(xk, yr) for yr in txt) for xk in img) / len(img))
            # text -> image: for each real text token, its best real image token; mean over text tokens
            row_t.append(sum(max(_dot(xk, yr) for xk in img) for yr in txt) / len(txt))
        s_i.append(row_i)
        s_t.append(row_t)
    return s_i, s_t


def loop_filip_loss(s_i: list[list[float]], s_t: list[list[float]], scale: float) -> float:
    """1/2 [mean_i CE(row i of scale*s^I, target i) + mean_j CE(column j of scale*s^T, target j)]."""
    b = len(s_i)
    rows = 0.0
    for i in range(b):
        logits = [scale * s_i[i][j] for j in range(b)]
        rows += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    cols = 0.0
    for j in range(b):
        logits = [scale * s_t[i][j] for i in range(b)]
        cols += math.log(sum(math.exp(v) for v in logits)) - logits[j]
    return 0.5 * (rows / b + cols / b)


# ----------------------------------------------------------------------------- random inputs


def _random_case(b_i: int, b_t: int, n1: int, n2: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b_i, n1, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(b_t, n2, d, generator=g, dtype=dtype), dim=-1)
    xm = torch.rand(b_i, n1, generator=g) < 0.6
    ym = torch.rand(b_t, n2, generator=g) < 0.5
    # At least one real token per sample, not always at position 0.
    xm[torch.arange(b_i), torch.randint(0, n1, (b_i,), generator=g)] = True
    ym[torch.arange(b_t), torch.randint(0, n2, (b_t,), generator=g)] = True
    return x, y, xm, ym


def _tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- late interaction


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES)
def test_late_interaction_matches_python_loop(shape, impl: str) -> None:
    for seed in range(3):
        x, y, xm, ym = _random_case(*shape, seed=seed)
        if shape[2] > 1 and shape[3] > 1:
            # The case must exercise padding on both sides.
            assert (~xm).any() and (~ym).any(), "test case without padding"
        s_i, s_t = IMPLS[impl](x, y, xm, ym)
        ref_i, ref_t = loop_late_interaction(x, y, xm, ym)
        assert s_i.shape == s_t.shape == (shape[0], shape[1])
        torch.testing.assert_close(s_i, _tensor(ref_i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s_t, _tensor(ref_t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_late_interaction_without_masks_uses_every_token(impl: str) -> None:
    x, y, _, _ = _random_case(3, 4, 6, 5, 8, seed=7)
    s_i, s_t = IMPLS[impl](x, y, None, None)
    ref_i, ref_t = loop_late_interaction(x, y, torch.ones(3, 6, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool))
    torch.testing.assert_close(s_i, _tensor(ref_i), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_t, _tensor(ref_t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("fill", [1e6, -1e6])
def test_padded_positions_do_not_matter(impl: str, fill: float) -> None:
    x, y, xm, ym = _random_case(4, 5, 8, 10, 16, seed=11)
    assert (~xm).any() and (~ym).any()
    clean = IMPLS[impl](x, y, xm, ym)

    x_bad, y_bad = x.clone(), y.clone()
    x_bad[~xm] = fill  # garbage in every padded image token ...
    y_bad[~ym] = fill  # ... and every padded text token
    dirty = IMPLS[impl](x_bad, y_bad, xm, ym)
    for a, b in zip(dirty, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    # The garbage is big enough to show up if the masks were ignored.
    unmasked = late_interaction(x_bad, y_bad, torch.ones_like(xm), torch.ones_like(ym))
    for a, b in zip(unmasked, clean):
        assert (a - b).abs().max() > 1.0


@pytest.mark.parametrize("impl", list(IMPLS))
def test_padding_on_each_side_changes_the_result(impl: str) -> None:
    """Masking a real token out does change the scores: the masks are read, on both sides."""
    x, y, xm, ym = _random_case(3, 3, 8, 8, 8, seed=5)
    xm[:] = True
    ym[:] = True
    full = IMPLS[impl](x, y, xm, ym)
    for side in ("image", "text"):
        xm2, ym2 = xm.clone(), ym.clone()
        (xm2 if side == "image" else ym2)[:, 1::2] = False
        part = IMPLS[impl](x, y, xm2, ym2)
        ref_i, ref_t = loop_late_interaction(x, y, xm2, ym2)
        torch.testing.assert_close(part[0], _tensor(ref_i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part[1], _tensor(ref_t), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(part[0], full[0]) and not torch.allclose(part[1], full[1]), side


@pytest.mark.parametrize("impl", list(IMPLS))
def test_the_two_directions_differ(impl: str) -> None:
    x, y, xm, ym = _random_case(4, 4, 9, 11, 8, seed=3)
    s_i, s_t = IMPLS[impl](x, y, xm, ym)
    assert (s_i - s_t).abs().max() > 1e-2
    # Neither direction is the other one transposed-by-role either (s^T(i,j) is not s^I(j,i)).
    assert (s_t - s_i.t()).abs().max() > 1e-2


# ----------------------------------------------------------------------------- global similarity


def test_global_similarity_is_the_plain_dot_product() -> None:
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    s1, s2 = global_similarity(a, b)
    ref = _tensor([[_dot(ai, bj) for bj in b.tolist()] for ai in a.tolist()])
    assert s1.shape == s2.shape == (5, 7)
    torch.testing.assert_close(s1, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, a @ b.t(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the loss, one process


def _features(b: int, n1: int, n2: int, d: int, seed: int, dtype=torch.float64) -> Features:
    x, y, xm, ym = _random_case(b, b, n1, n2, d, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    ie = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    te = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return Features(x, xm, y, ym, ie, te)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
@pytest.mark.parametrize("b,n1,n2,d", [(4, 5, 7, 8), (6, 10, 12, 16), (1, 3, 4, 4)])
def test_late_loss_single_process_matches_paper(b: int, n1: int, n2: int, d: int, scale: float) -> None:
    f = _features(b, n1, n2, d, seed=b * 100 + n1)
    loss = filip_loss(f, f, torch.tensor([scale], dtype=torch.float64), offset=0, interaction="late")
    s_i, s_t = loop_late_interaction(f.image_tokens, f.text_tokens, f.image_mask, f.text_mask)
    ref = loop_filip_loss(s_i, s_t, scale)
    assert loss.numel() == 1
    # filip_loss runs the softmax in fp32 on purpose (see models/loss.py), hence an fp32 tolerance.
    assert loss.item() == pytest.approx(ref, rel=1e-6, abs=1e-6)
    if b > 1:
        # The two directions enter the loss separately: using s^I (or s^T) twice gives another number.
        assert abs(loop_filip_loss(s_i, s_i, scale) - ref) > 1e-6
        assert abs(loop_filip_loss(s_t, s_t, scale) - ref) > 1e-6


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
@pytest.mark.parametrize("b,d", [(4, 8), (7, 16), (1, 4)])
def test_global_loss_single_process_matches_paper(b: int, d: int, scale: float) -> None:
    f = _features(b, 3, 4, d, seed=b * 10 + d)
    loss = filip_loss(f, f, torch.tensor([scale], dtype=torch.float64), offset=0, interaction="global")
    ie, te = f.image_embed.tolist(), f.text_embed.tolist()
    sim = [[_dot(ie[i], te[j]) for j in range(b)] for i in range(b)]
    ref = loop_filip_loss(sim, sim, scale)
    assert loss.item() == pytest.approx(ref, rel=1e-6, abs=1e-6)  # fp32 softmax, as above
    # And it is not the late loss of the same features.
    if b > 1:
        late = filip_loss(f, f, torch.tensor([scale], dtype=torch.float64), offset=0, interaction="late")
        assert abs(late.item() - loss.item()) > 1e-6


def test_loss_gradient_reaches_tokens_and_scale() -> None:
    f = _features(4, 5, 6, 8, seed=9)
    x = f.image_tokens.clone().requires_grad_()
    y = f.text_tokens.clone().requires_grad_()
    scale = torch.tensor([1 / 0.07], dtype=torch.float64, requires_grad=True)
    f = Features(x, f.image_mask, y, f.text_mask, f.image_embed, f.text_embed)
    filip_loss(f, f, scale, offset=0, interaction="late").backward()
    for g in (x.grad, y.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0
    # Padded tokens get no gradient.
    assert x.grad[~f.image_mask].abs().max() == 0
    assert y.grad[~f.text_mask].abs().max() == 0


def test_unknown_interaction_is_rejected() -> None:
    f = _features(2, 3, 3, 4, seed=0)
    with pytest.raises(ValueError):
        filip_loss(f, f, torch.tensor([1.0], dtype=torch.float64), offset=0, interaction="mean")


@pytest.mark.parametrize("drop_cls,drop_bos", [(True, False), (False, True), (True, True)])
def test_special_tokens_can_be_left_out_of_late_interaction(drop_cls: bool, drop_bos: bool) -> None:
    """model.late_image_cls / late_text_bos false: the scores equal late interaction on the tokens without them."""
    from filipctl.schema import ModelConfig
    from models.filip import build_model
    from models.interaction import similarity
    from models.tokenizer import tokenize

    cfg = ModelConfig.model_validate({"embed_dim": 16, "late_image_cls": not drop_cls, "late_text_bos": not drop_bos,
                                      "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                                      "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, 32, 32))
        txt = model.encode_text(tokenize(["a red circle", "a blue square at the top", "x"], 16))
    assert bool(img.mask[:, 0].any()) is not drop_cls and bool(txt.mask[:, 0].any()) is not drop_bos
    assert torch.equal(img.pooled, img.tokens[:, 0])  # the global interaction still sees [CLS]
    got = similarity(img, txt, "late")
    i0, t0 = int(drop_cls), int(drop_bos)
    ref = late_interaction(img.tokens[:, i0:], txt.tokens[:, t0:], img.mask[:, i0:], txt.mask[:, t0:])
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-6)
