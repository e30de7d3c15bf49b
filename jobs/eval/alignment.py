"""Word-patch alignment: which text token each image patch matches best (FILIP, figure 4), and pointing accuracy.

Both read the unit-norm token features the towers produce (models/filip.py: image tokens are
[CLS] followed by the g x g patches in row-major order), so they can be computed for a model
trained with either interaction; only late interaction trains patches and words to align.

Pointing accuracy (on sets whose samples carry object boxes: the shapes generator): for the
prompt naming one object ("a photo of a red circle."), the patch that best matches the colour
word and the one that best matches the shape word; a hit when the patch's centre lies inside the
object's box. Chance is the share of patch centres inside the box. Objects stand out from a plain
background even to an untrained tower, so `pointing_on_any_object` (the patch lies on some object,
named or not) is reported beside it: pointing_acc close to it means the words pick the right object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.tokenizer import get_tokenizer, tokenize


def patch_matches(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """image_tokens [1+P, d] ([CLS] first), text_tokens [L, d], text_mask [L] -> [P] index of each patch's best real token."""
    sim = image_tokens[1:] @ text_tokens.t()  # [P, L]
    return sim.masked_fill(~text_mask[None, :], -torch.inf).argmax(dim=1)


def best_patch(image_tokens: Tensor, token: Tensor) -> int:
    """image_tokens [1+P, d], token [d] -> index (0..P-1) of the patch that matches the token best."""
    return int((image_tokens[1:] @ token).argmax())


def token_strings(ids: Tensor, context_length: int) -> list[str]:
    """[L] ids -> the readable token of each real position ('<start>', 'red', ..., '<end>')."""
    tok = get_tokenizer(context_length)
    decoder = getattr(tok, "decoder", {})
    out = []
    for i in ids.tolist():
        if i == 0:
            break
        word = decoder.get(i, str(i))
        out.append({"<start_of_text>": "<start>", "<end_of_text>": "<end>"}.get(word, word.replace("</w>", "")))
    return out


def word_position(prompt_ids: Tensor, word: str, context_length: int) -> int | None:
    """Position in `prompt_ids` [L] of the last BPE token of `word` (None when the prompt lacks it)."""
    word_ids = tokenize([word], context_length)[0]
    inner = word_ids[1 : int((word_ids != 0).sum()) - 1].tolist()  # without [BOS] and [EOS]
    ids = prompt_ids.tolist()
    for start in range(len(ids) - len(inner) + 1):
        if ids[start : start + len(inner)] == inner:
            return start + len(inner) - 1
    return None


def patch_centres(grid: int, image_size: int) -> Tensor:
    """[P, 2] (x, y) pixel centre of each patch, row-major."""
    cell = image_size / grid
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([(cols.flatten() + 0.5) * cell, (rows.flatten() + 0.5) * cell], dim=1)


def inside(points: Tensor, box: list[float]) -> Tensor:
    x0, y0, x1, y1 = box
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def scaled_box(obj: dict[str, Any], meta: dict[str, Any], image_size: int) -> list[float]:
    """The object's box in the model's input pixels (the eval transform resizes W x H to image_size squared)."""
    sx = image_size / float(meta.get("width") or image_size)
    sy = image_size / float(meta.get("height") or image_size)
    x0, y0, x1, y1 = obj["box"]
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


class Pointing:
    """Counts pointing hits per word kind (colour, shape) and the chance level, over many images."""

    def __init__(self) -> None:
        self.hits = {"colour": 0, "shape": 0}
        self.total = {"colour": 0, "shape": 0}
        self.on_object = 0  # the best patch lies on some object, named or not
        self.chance_sum = 0.0
        self.objects = 0

    def add(self, image_tokens: Tensor, prompt_tokens: Tensor, positions: dict[str, int], box: list[float],
            others: list[list[float]], centres: Tensor) -> None:
        """One object: image_tokens [1+P, d], prompt_tokens [L, d], positions {'colour': pos, 'shape': pos};
        `others`: the boxes of the image's other objects."""
        in_box = inside(centres, box)
        on_any = in_box.clone()
        for other in others:
            on_any |= inside(centres, other)
        self.chance_sum += int(in_box.sum()) / in_box.numel()  # Python floats: no float32 noise in the result
        self.objects += 1
        for kind, pos in positions.items():
            patch = best_patch(image_tokens, prompt_tokens[pos])
            self.hits[kind] += int(in_box[patch])
            self.on_object += int(on_any[patch])
            self.total[kind] += 1

    def metrics(self) -> dict[str, float]:
        if not self.objects:
            return {}
        hits, total = sum(self.hits.values()), sum(self.total.values())
        return {"pointing_acc": hits / total, "pointing_colour": self.hits["colour"] / max(1, self.total["colour"]),
                "pointing_shape": self.hits["shape"] / max(1, self.total["shape"]),
                "pointing_on_any_object": self.on_object / total,
                "pointing_chance": self.chance_sum / self.objects, "pointing_objects": float(self.objects)}


def _plain(text: str) -> str:
    return text.replace("$", r"\$")


def draw(image: Any, matches: Tensor, grid: int, tokens: list[str], title: str, path: Path,
         highlight: set[int] | None = None) -> None:
    """The image with its patch grid coloured by matched token index and numbered, a legend of the tokens.

    image: PIL image as the model saw it (any size; shown square); matches [P]; tokens: the prompt's
    real tokens. Patches matched to a `highlight` token (the class words) are drawn opaque.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    size = 256
    shown = image.convert("RGB").resize((size, size))
    cell = size / grid
    cmap = plt.get_cmap("tab20")
    highlight = highlight or set()
    fig, ax = plt.subplots(figsize=(5.6, 4.2), dpi=100)
    ax.imshow(shown, extent=(0, size, size, 0))
    for p, t in enumerate(matches.tolist()):
        r, c = divmod(p, grid)
        strong = t in highlight
        ax.add_patch(Rectangle((c * cell, r * cell), cell, cell, facecolor=cmap(t % 20),
                               alpha=0.55 if strong else 0.18, edgecolor="white", linewidth=0.3))
        if grid <= 16:
            ax.text((c + 0.5) * cell, (r + 0.5) * cell, str(t), ha="center", va="center", fontsize=7,
                    color="black", fontweight="bold" if strong else "normal")
    used = sorted(set(matches.tolist()))
    # '$' would start matplotlib mathtext: a caption holding one must print as it is.
    handles = [Patch(facecolor=cmap(t % 20), label=_plain(f"{t}: {tokens[t] if t < len(tokens) else '?'}"))
               for t in used]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False,
              title="matched token", title_fontsize=7)
    ax.set_title(_plain(title), fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
