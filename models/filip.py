"""The FILIP dual encoder: open_clip ViT and text Transformer, per-token projections, unit-norm tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tokenizer import text_mask

if TYPE_CHECKING:  # the recipe's typed sections; only their attributes are read
    from filipctl.schema import ImageTower, ModelConfig, TextTower


class Encoded(NamedTuple):
    """One modality of a batch, as the interactions score it (unit-norm along d)."""

    tokens: Tensor  # [B, n, d]
    mask: Tensor  # [B, n] bool, False on padding
    pooled: Tensor  # [B, d] one vector per sample, for the global (CLIP) interaction


@dataclass
class Features:
    """What one forward pass produces for a batch of B pairs (all unit-norm along d)."""

    image_tokens: Tensor  # [B, n1, d]  [CLS] + patches
    image_mask: Tensor  # [B, n1] bool (False on [CLS] when model.late_image_cls is false)
    text_tokens: Tensor  # [B, n2, d]
    text_mask: Tensor  # [B, n2] bool, False on padding
    image_embed: Tensor  # [B, d]  pooled [CLS], for the global (CLIP) interaction
    text_embed: Tensor  # [B, d]  pooled [EOS]

    @property
    def image(self) -> Encoded:
        return Encoded(self.image_tokens, self.image_mask, self.image_embed)

    @property
    def text(self) -> Encoded:
        return Encoded(self.text_tokens, self.text_mask, self.text_embed)


class FILIP(nn.Module):
    def __init__(self, embed_dim: int, image: "ImageTower", text: "TextTower", init_temperature: float = 0.07,
                 late_image_cls: bool = True, late_text_bos: bool = True) -> None:
        super().__init__()
        # Which special tokens the token masks let into late interaction (pooled vectors are unaffected).
        self.late_image_cls = late_image_cls
        self.late_text_bos = late_text_bos
        from open_clip.transformer import TextTransformer, VisionTransformer

        self.visual = VisionTransformer(
            image_size=image.image_size,
            patch_size=image.patch_size,
            width=image.width,
            layers=image.layers,
            heads=image.heads,
            mlp_ratio=image.mlp_ratio,
            output_dim=embed_dim,
            output_tokens=True,
        )
        # FILIP projects every token with one linear map, so drop open_clip's pooled-only projection.
        self.visual.proj = None
        self.text = TextTransformer(
            context_length=text.context_length,
            vocab_size=text.vocab_size,
            width=text.width,
            heads=text.heads,
            layers=text.layers,
            output_dim=None,
            output_tokens=True,
        )
        self.image_proj = nn.Linear(image.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width ** -0.5)
        # Learnable log inverse temperature, as in CLIP: logits = exp(logit_scale) * sim.
        # Shape [1], not a scalar: DeepSpeed cannot broadcast 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: Tensor) -> Encoded:
        """[B, 3, H, W] -> tokens [B, 1+P, d], mask [B, 1+P], pooled [B, d]; unit-norm."""
        pooled, patches = self.visual(images)  # [B, w], [B, P, w]
        tokens = torch.cat([pooled[:, None, :], patches], dim=1)  # [B, 1+P, w]
        tokens = F.normalize(self.image_proj(tokens), dim=-1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if not self.late_image_cls:
            mask[:, 0] = False
        return Encoded(tokens, mask, tokens[:, 0])

    def encode_text(self, ids: Tensor) -> Encoded:
        """[B, L] token ids -> tokens [B, L, d], mask [B, L] (False on padding), pooled [EOS] [B, d]."""
        pooled, tokens = self.text(ids)  # [B, w], [B, L, w]
        tokens = F.normalize(self.text_proj(tokens), dim=-1)
        embed = F.normalize(self.text_proj(pooled), dim=-1)
        mask = text_mask(ids)
        if not self.late_text_bos:
            mask = mask.clone()
            mask[:, 0] = False  # position 0 is [BOS] in every caption
        return Encoded(tokens, mask, embed)

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Features, Tensor]:
        """-> (features, logit scale = 1 / temperature).

        The scale is returned from forward because under ZeRO-3 parameters exist in full
        only inside the module's forward.
        """
        it, im, ie = self.encode_image(images)
        tt, tm, te = self.encode_text(ids)
        return Features(it, im, tt, tm, ie, te), self.temperature_scale()

    def temperature_scale(self) -> Tensor:
        # Clamp as CLIP does (temperature >= 0.01) so the logits cannot blow up.
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def build_model(cfg: "ModelConfig") -> FILIP:
    """A FILIP from the recipe's typed `model` section (the loss settings go to models.loss.FilipLoss)."""
    return FILIP(embed_dim=cfg.embed_dim, image=cfg.image, text=cfg.text, init_temperature=cfg.init_temperature,
                 late_image_cls=cfg.late_image_cls, late_text_bos=cfg.late_text_bos)
