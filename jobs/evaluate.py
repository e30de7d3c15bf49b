"""Evaluate a pretrained FILIP on the held-out split: zero-shot classification and image<->text retrieval.

    python -m jobs.evaluate --recipe R.json --workdir DIR     (reads DIR/model.pt, writes DIR/eval.json)

Image queries (classification, image->text retrieval) rank texts by s^I(i, j); text queries
(text->image retrieval) rank images by s^T(i, j). The prompt ensemble averages the token-wise
SIMILARITY over the prefix x suffix templates, not the text embeddings (FILIP, section 3.1.2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jobs.loader import eval_set
from jobs.metrics import StageLogger
from jobs.synthetic import read_manifest
from models.filip import FILIP, build_model
from models.interaction import global_similarity, late_interaction_chunked
from models.tokenizer import tokenize


@torch.no_grad()
def encode_images(model: FILIP, images: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    parts = [model.encode_image(images[i : i + batch]) for i in range(0, len(images), batch)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


@torch.no_grad()
def encode_texts(model: FILIP, texts: list[str], context_length: int, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    parts = [model.encode_text(tokenize(texts[i : i + batch], context_length)) for i in range(0, len(texts), batch)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


@torch.no_grad()
def similarity(img: tuple[Tensor, Tensor, Tensor], txt: tuple[Tensor, Tensor, Tensor], interaction: str,
               memory_mb: float = 256.0) -> tuple[Tensor, Tensor]:
    """(s^I, s^T), each [N_img, N_txt], in memory-bounded blocks."""
    if interaction == "global":
        return global_similarity(img[2], txt[2])
    return late_interaction_chunked(img[0], txt[0], img[1], txt[1], memory_mb=memory_mb)


def recall_at(scores: Tensor, ks: list[int]) -> dict[int, float]:
    """scores [Q, N], the correct item of query q is item q -> {k: fraction of queries with it in the top k}."""
    correct = scores.diagonal()[:, None]
    rank = (scores > correct).sum(dim=1)  # 0 = ranked first
    return {k: (rank < k).float().mean().item() for k in ks}


def zero_shot_accuracy(model: FILIP, img, labels: list[int], classes: list[str], prefixes: list[str],
                       suffixes: list[str], context_length: int, interaction: str, batch: int,
                       memory_mb: float = 256.0) -> float:
    templates = [(p, s) for p in prefixes for s in suffixes]
    total = torch.zeros(len(labels), len(classes))
    for prefix, suffix in templates:
        prompts = [f"{prefix} {c}. {suffix}".strip() for c in classes]
        txt = encode_texts(model, prompts, context_length, batch)
        s_i2t, _ = similarity(img, txt, interaction, memory_mb)
        total += s_i2t
    pred = (total / len(templates)).argmax(dim=1)
    return (pred == torch.tensor(labels)).float().mean().item()


def evaluate(recipe: dict[str, Any], workdir: Path) -> dict[str, float]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_cfg, eval_cfg, data_cfg = recipe["model"], recipe["eval"], recipe["data"]
    manifest = read_manifest(data_cfg["url"])
    if manifest is None:
        raise SystemExit(f"no dataset at {data_cfg['url']}: run the data stage first")
    weights = workdir / "model.pt"
    if not weights.is_file():
        raise SystemExit(f"{weights} not found: run the pretrain stage first")
    model = build_model(model_cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()

    images, captions, labels = eval_set(data_cfg["url"], manifest["shards"]["eval"], model_cfg["image"]["image_size"])
    ctx, bs, interaction = model_cfg["text"]["context_length"], eval_cfg["batch_size"], model_cfg["interaction"]
    img = encode_images(model, images, bs)
    txt = encode_texts(model, captions, ctx, bs)
    s_i2t, s_t2i = similarity(img, txt, interaction, model_cfg["similarity_memory_mb"])
    ks = eval_cfg["recall_at"]
    metrics: dict[str, float] = {}
    for k, v in recall_at(s_i2t, ks).items():
        metrics[f"i2t_R{k}"] = v
    for k, v in recall_at(s_t2i.t(), ks).items():
        metrics[f"t2i_R{k}"] = v
    classes = manifest["classes"]
    metrics["zeroshot_top1"] = zero_shot_accuracy(model, img, labels, classes, eval_cfg["prefixes"],
                                                  eval_cfg["suffixes"], ctx, interaction, bs,
                                                  model_cfg["similarity_memory_mb"])
    # What guessing would score, so a reader can tell learning from luck.
    metrics["chance_zeroshot_top1"] = 1.0 / len(classes)
    metrics["chance_R1"] = 1.0 / len(captions)
    metrics["eval_pairs"] = float(len(captions))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    recipe = json.loads(Path(args.recipe).read_text())
    workdir = Path(args.workdir)
    metrics = evaluate(recipe, workdir)
    StageLogger(True).metrics(metrics)
    (workdir / "eval.json").write_text(json.dumps(metrics, indent=1))
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
