"""Word-patch alignment maps (FILIP, figure 4) of the first images of a set, as PNGs beside the results.

Each image is drawn with the prompt of its class (the set's first template) when it has one, else
with its first caption; the patches that match the class name's words are drawn opaque.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from filipctl.schema import EvalConfig
from jobs.eval import alignment
from jobs.eval.encoder import Encoder
from jobs.eval.prompts import class_templates
from jobs.eval.sets import EvalBatch, EvalSet
from models.filip import Encoded


class AlignmentMaps:
    """Observes the evaluated split (jobs/eval/split_pass.py); draws every image the pass kept raw."""

    def __init__(self, ds: EvalSet, encoder: Encoder, ev: EvalConfig, grid: int, folder: Path) -> None:
        self.ds, self.encoder, self.grid = ds, encoder, grid
        self.template = class_templates(ds, ev)[0]
        self.folder = folder / ds.name
        self.drawn = 0

    def observe(self, batch: EvalBatch, images: Encoded, first: int) -> None:
        for i, pil in enumerate(batch.raw):  # only the first images of the split are kept raw
            label = batch.labels[i] if batch.labels else None
            self._draw(pil, images.tokens[i], label, batch.captions[i])

    def _draw(self, pil: Any, image_tokens: Tensor, label: int | None, captions: list[str]) -> None:
        """image_tokens [1+P, d]: one image's tokens, [CLS] first."""
        ds, ctx = self.ds, self.encoder.context_length
        if label is not None and ds.classnames:
            classname: str | None = ds.classnames[label]
            text = self.template.replace("{c}", classname)
        else:
            classname, text = None, captions[0]
        prompt = self.encoder.prompt(text)
        matches = alignment.patch_matches(image_tokens, prompt.tokens, prompt.mask)  # [P]
        highlight = set()
        for word in (classname or "").split():
            pos = alignment.word_position(prompt.ids, word, ctx)
            if pos is not None:
                highlight.add(pos)
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.drawn
        alignment.draw(pil, matches, self.grid, alignment.token_strings(prompt.ids, ctx),
                       f"{ds.name} #{index}: “{text}”", self.folder / f"{index:03d}.png", highlight)
        self.drawn += 1
