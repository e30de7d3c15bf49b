"""Token reduction before the gather: equals a brute-force selection, never picks padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.filip import Features
from models.loss import FilipLoss, reduce_for_gather
from models.token_selection import select_tokens, slots_needed, token_scores


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _mask(b: int, n: int, p_real: float) -> torch.Tensor:
    m = torch.rand(b, n) < p_real
    m[:, 0] = True
    return m


def _brute_force(tokens, mask, other, other_mask, keep):
    """Straight from the paper: score = max over every real token of every other sample; keep the top ceil(keep*real)."""
    chosen = []
    for b in range(tokens.shape[0]):
        scores = {}
        for k in range(tokens.shape[1]):
            if not mask[b, k]:
                continue
            best = -math.inf
            for j in range(other.shape[0]):
                for r in range(other.shape[1]):
                    if other_mask[j, r]:
                        best = max(best, float(tokens[b, k] @ other[j, r]))
            scores[k] = best
        n_keep = max(1, math.ceil(keep * len(scores)))
        chosen.append(sorted(scores, key=scores.get, reverse=True)[:n_keep])
    return chosen


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_brute_force(keep: float, seed: int) -> None:
    torch.manual_seed(seed)
    tokens, mask = _unit(4, 9, 6), _mask(4, 9, 0.6)
    other, other_mask = _unit(3, 7, 6), _mask(3, 7, 0.7)
    scores = token_scores(tokens, mask, other, other_mask, memory_mb=1e-4)  # tiny budget: many blocks
    kept, kept_mask = select_tokens(tokens, mask, scores, keep)
    assert kept.shape == (4, math.ceil(keep * 9), 6)
    for b, want in enumerate(_brute_force(tokens, mask, other, other_mask, keep)):
        got = kept[b][kept_mask[b]]
        assert got.shape[0] == len(want)
        assert torch.equal(got, tokens[b, want])  # same tokens, best first
        assert torch.all(kept[b][~kept_mask[b]] == 0)  # empty slots carry nothing


def test_padding_is_never_selected_even_when_it_would_score_best() -> None:
    torch.manual_seed(0)
    other, other_mask = _unit(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    tokens = _unit(1, 6, 4)
    mask = torch.tensor([[True, True, False, False, False, True]])
    tokens[0, 2] = other[0, 0]  # a padded token identical to a text token: similarity 1, the maximum
    scores = token_scores(tokens, mask, other, other_mask)
    kept, kept_mask = select_tokens(tokens, mask, scores, 0.5)
    for slot in kept[0][kept_mask[0]]:
        assert not torch.equal(slot, tokens[0, 2])
    assert int(kept_mask.sum()) == 2  # ceil(0.5 * 3 real tokens)


def test_keep_one_sends_everything_unchanged() -> None:
    feats = Features(_unit(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), _unit(2, 7, 4), _mask(2, 7, 0.5),
                     _unit(2, 4), _unit(2, 4))
    assert reduce_for_gather(feats, 1.0) is feats


def _captions(lengths: list[int], n: int = 12) -> torch.Tensor:
    """Text masks of real captions: the first `length` tokens real, the rest padding."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def test_slots_needed_is_the_longest_kept_caption() -> None:
    mask = _captions([3, 9, 5])
    assert slots_needed(mask, 1.0) == 9  # every real token, padding after the longest caption cut
    assert slots_needed(mask, 0.25) == math.ceil(0.25 * 9) == 3
    assert slots_needed(mask, 0.5) == 5
    gappy = torch.tensor([[False, True, False, True, False, False]])  # a masked [BOS], real tokens not a prefix
    assert slots_needed(gappy, 1.0) == 4


@pytest.mark.parametrize("keep", [0.25, 1.0])
def test_text_slots_cut_padding_not_tokens(keep: float) -> None:
    """Sized to the longest kept caption, the gather carries the same real tokens and the loss does not change."""
    torch.manual_seed(5)
    b, n2 = 6, 12
    feats = Features(_unit(b, 5, 4), torch.ones(b, 5, dtype=torch.bool), _unit(b, n2, 4),
                     _captions([2, 4, 7, 3, 1, 5], n2), _unit(b, 4), _unit(b, 4))
    wide = reduce_for_gather(feats, keep)
    slots = slots_needed(feats.text_mask, keep)
    narrow = reduce_for_gather(feats, keep, text_slots=slots)
    assert narrow.text_tokens.shape[1] == slots < wide.text_tokens.shape[1]
    for s in range(b):
        assert torch.equal(narrow.text_tokens[s][narrow.text_mask[s]], wide.text_tokens[s][wide.text_mask[s]])
    scale = torch.tensor(10.0)
    from models.loss import filip_loss

    torch.testing.assert_close(filip_loss(feats, narrow, scale, 0), filip_loss(feats, wide, scale, 0),
                               rtol=1e-12, atol=1e-12)
    # FilipLoss sizes it by itself: the same loss as the context-length gather.
    torch.testing.assert_close(FilipLoss("late", keep)(feats, scale), filip_loss(feats, wide, scale, 0),
                               rtol=1e-12, atol=1e-12)


def test_reduce_for_gather_scores_each_side_against_the_other() -> None:
    torch.manual_seed(3)
    img, im = _unit(3, 8, 5), torch.ones(3, 8, dtype=torch.bool)
    txt, tm = _unit(3, 10, 5), _mask(3, 10, 0.6)
    sent = reduce_for_gather(Features(img, im, txt, tm, img[:, 0], txt[:, 0]), 0.25)
    assert sent.image_tokens.shape == (3, 2, 5) and sent.text_tokens.shape == (3, 3, 5)
    want_img = _brute_force(img, im, txt, tm, 0.25)
    want_txt = _brute_force(txt, tm, img, im, 0.25)
    for b in range(3):
        assert torch.equal(sent.image_tokens[b][sent.image_mask[b]], img[b, want_img[b]])
        assert torch.equal(sent.text_tokens[b][sent.text_mask[b]], txt[b, want_txt[b]])


def test_kept_tokens_carry_gradient() -> None:
    img = _unit(2, 6, 4).requires_grad_()
    txt = _unit(2, 5, 4)
    feats = Features(img, torch.ones(2, 6, dtype=torch.bool), txt, torch.ones(2, 5, dtype=torch.bool),
                     img[:, 0], txt[:, 0])
    sent = reduce_for_gather(feats, 0.5)
    sent.image_tokens.sum().backward()
    per_token = img.grad.abs().sum(-1)  # [2, 6]
    assert torch.equal((per_token > 0).sum(1), torch.tensor([3, 3]))  # exactly the kept tokens
