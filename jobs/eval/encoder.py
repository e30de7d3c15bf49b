"""The model's forward passes as evaluation makes them: image batches, texts in batches, single prompts.

Only encoding lives here; what is kept of the features (files on disk, probe vectors, maps) is
each task's business. Texts are always encoded in the same groups (eval.batch_size at a time,
prompts one by one): a matrix product's last bits depend on the batch it is computed in, and
the figures must not change with the order tasks run in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from models.filip import FILIP, Encoded
from models.tokenizer import tokenize


class Prompt(NamedTuple):
    """One text encoded alone, with its token ids (to find a word's position in it)."""

    ids: Tensor  # [L] token ids, 0 = padding
    tokens: Tensor  # [L, d] unit-norm token features
    mask: Tensor  # [L] bool, False on padding


class Encoder:
    """Encodes images and texts with one model, in eval mode and without gradients."""

    def __init__(self, model: FILIP, context_length: int, batch_size: int) -> None:
        self.model = model
        self.context_length = context_length
        self.batch_size = batch_size
        self._prompts: dict[str, Prompt] = {}  # the same few prompts recur on every image (maps, pointing)

    @torch.no_grad()
    def images(self, pixels: Tensor) -> Encoded:
        """[B, 3, H, W] -> tokens [B, 1+P, d] ([CLS] first), mask [B, 1+P], pooled [B, d]."""
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> Encoded:
        """N texts, batch_size at a time -> tokens [N, L, d], mask [N, L], pooled [N, d]."""
        parts = [self.model.encode_text(tokenize(texts[i : i + self.batch_size], self.context_length))
                 for i in range(0, len(texts), self.batch_size)]
        return Encoded(*(torch.cat(p) for p in zip(*parts)))

    @torch.no_grad()
    def prompt(self, text: str) -> Prompt:
        """One text encoded on its own, cached."""
        if text not in self._prompts:
            ids = tokenize([text], self.context_length)  # [1, L]
            enc = self.model.encode_text(ids)
            self._prompts[text] = Prompt(ids[0], enc.tokens[0], enc.mask[0])
        return self._prompts[text]
