"""Bytes all-gathered per step by the late-interaction loss: fp32 with every token vs the paper's fp16 + 25%.

    .venv/bin/python benchmarks/gather_bytes.py [--local-batch 512] [--workers 8]

The features are real: produced by models.loss.reduce_for_gather on random unit tokens with
ViT-B/32 shapes (n1 = 50 image tokens, context length n2 = 77, d = 256) and counted exactly as
models.gather.gather_features sends them (token tensors in the wire dtype + uint8 masks). Text slots are
sized as models.loss.FilipLoss sizes them: the longest kept caption of the global batch (every caption
here has --real-text-tokens real tokens). The reference, 100%, is late interaction in fp32 with every
token in context-length slots (77 per text), as the gather sent before it was sized to the captions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.gather import gathered_bytes  # noqa: E402
from models.filip import Features  # noqa: E402
from models.loss import reduce_for_gather  # noqa: E402
from models.token_selection import slots_needed  # noqa: E402


def features(b: int, n1: int, n2: int, d: int, real_text: int) -> Features:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(b, n1, d), dim=-1)
    txt = F.normalize(torch.randn(b, n2, d), dim=-1)
    tm = torch.zeros(b, n2, dtype=torch.bool)
    tm[:, :real_text] = True
    return Features(img, torch.ones(b, n1, dtype=torch.bool), txt, tm, img[:, 0], txt[:, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local-batch", type=int, default=512, help="pairs per worker (paper: 512 per GPU)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--real-text-tokens", type=int, default=20, help="unpadded tokens per caption")
    args = ap.parse_args()
    local = features(args.local_batch, 50, 77, 256, args.real_text_tokens)
    settings = [("global (pooled)", "global", "fp32", 1.0), ("late", "late", "fp32", 1.0),
                ("late", "late", "fp16", 1.0), ("late", "late", "fp16", 0.5), ("late (paper final)", "late", "fp16", 0.25)]
    base = gathered_bytes(local, "late", "fp32", args.workers)  # every token, 77 text slots
    print(f"per worker per step, local batch {args.local_batch}, {args.workers} workers, n1=50, context n2=77, "
          f"{args.real_text_tokens} real tokens per caption, d=256\n")
    print("| loss | wire dtype | tokens kept | image slots | text slots | MB received | vs late fp32, all tokens, 77 slots |")
    print("|---|---|---|---|---|---|---|")
    print(f"| late (context-length slots) | fp32 | 100% | 50 | 77 | {base / 2**20:.1f} | 100.0% |")
    for name, inter, dtype, keep in settings:
        sent = local
        if inter == "late":
            sent = reduce_for_gather(local, keep, memory_mb=64, text_slots=slots_needed(local.text_mask, keep))
        nbytes = gathered_bytes(sent, inter, dtype, args.workers)
        slots = ("-", "-") if inter == "global" else (sent.image_tokens.shape[1], sent.text_tokens.shape[1])
        print(f"| {name} | {dtype} | {'-' if inter == 'global' else f'{keep:.0%}'} | {slots[0]} | {slots[1]} | "
              f"{nbytes / 2**20:.1f} | {nbytes / base:.1%} |")


if __name__ == "__main__":
    main()
