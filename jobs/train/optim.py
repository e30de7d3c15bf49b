"""Optimizer, LR schedule and weight-decay groups as in the paper (LAMB, warmup + cosine, sqrt LR scaling).

LAMB is jobs/train/lamb.py's: timm's math, but its trust ratio stays per parameter when ZeRO hands it flat
partitions (after deepspeed.initialize, jobs.train.lamb.attach_layout(engine) tells it the layout). Gradient
clipping is DeepSpeed's `gradient_clipping` (optim.grad_clip), over the global gradient, never the optimizer's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from filipctl.schema import OptimConfig

# Parameters named like these never get weight decay (besides every 0-/1-d tensor: biases, norms).
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale")


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Peak LR = base_lr * sqrt(global_batch / 512)."""
    return base_lr * math.sqrt(global_batch / 512)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: "OptimConfig", global_batch: int) -> torch.optim.Optimizer:
    lr = peak_lr(cfg.base_lr, global_batch)
    groups = param_groups(model, cfg.weight_decay)
    betas = tuple(cfg.betas)
    if cfg.name == "lamb":
        from jobs.train.lamb import Lamb

        return Lamb(groups, lr=lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "OptimConfig", total_steps: int):
    return warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup from 0 to the peak over warmup_steps, then cosine down to min_ratio * peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
