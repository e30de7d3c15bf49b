"""open_clip's CLIP BPE tokenizer (vocabulary 49,408, [BOS]=49406 ... [EOS]=49407, 0 = padding).

The recipe's model.text.vocab_size is checked against `vocab_size()` (schema and tests).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

PAD_ID = 0


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)


def vocab_size() -> int:
    return get_tokenizer(8).vocab_size


def tokenize(texts: list[str], context_length: int) -> Tensor:
    """Lower-cased BPE ids [len(texts), context_length] (long); captions longer than the context are cut."""
    return get_tokenizer(context_length)(texts)


def text_mask(ids: Tensor) -> Tensor:
    """True where a token is real ([BOS], words, [EOS]); False on padding. [B, L] -> [B, L] bool."""
    return ids != PAD_ID

