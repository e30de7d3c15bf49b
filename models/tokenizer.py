"""open_clip's CLIP BPE tokenizer (vocabulary 49,408, [BOS]=49406 ... [EOS]=49407, 0 = padding)."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

PAD_ID = 0


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)


def tokenize(texts: list[str], context_length: int) -> Tensor:
    """Lower-cased BPE ids [len(texts), context_length] (long); captions longer than the context are cut."""
    return get_tokenizer(context_length)(texts)


def text_mask(ids: Tensor) -> Tensor:
    """True where a token is real ([BOS], words, [EOS]); False on padding. [B, L] -> [B, L] bool."""
    return ids != PAD_ID


def _check() -> None:  # pragma: no cover - used interactively
    ids = tokenize(["a red square"], 16)
    assert ids.dtype == torch.long
