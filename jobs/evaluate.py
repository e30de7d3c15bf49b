"""Evaluate a pretrained FILIP on the held-out split: zero-shot classification and image<->text retrieval.

    python -m jobs.evaluate --workdir DIR     (reads DIR/model.pt, writes DIR/eval.json)

Image queries (classification, image->text retrieval) rank texts by s^I(i, j); text queries
(text->image retrieval) rank images by s^T(i, j). The prompt ensemble averages the token-wise
SIMILARITY over the prefix x suffix templates, not the text embeddings (FILIP, section 3.1.2).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import Tensor

from filipctl.contract import JobError, RunDir, job_main
from filipctl.schema import Recipe
from jobs.data_index import load_index
from jobs.loader import eval_set
from jobs.metrics import StageLogger
from models.filip import FILIP, Encoded, build_model
from models.interaction import similarity
from models.tokenizer import tokenize


def _cat(parts: list[Encoded]) -> Encoded:
    return Encoded(*(torch.cat(p) for p in zip(*parts)))


@torch.no_grad()
def encode_images(model: FILIP, images: Tensor, batch: int) -> Encoded:
    return _cat([model.encode_image(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def encode_texts(model: FILIP, texts: list[str], context_length: int, batch: int) -> Encoded:
    return _cat([model.encode_text(tokenize(texts[i : i + batch], context_length)) for i in range(0, len(texts), batch)])


def recall_at(scores: Tensor, ks: list[int]) -> dict[int, float]:
    """scores [Q, N], the correct item of query q is item q -> {k: fraction of queries with it in the top k}."""
    correct = scores.diagonal()[:, None]
    rank = (scores > correct).sum(dim=1)  # 0 = ranked first
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def zero_shot_accuracy(model: FILIP, img: Encoded, labels: list[int], classes: list[str], recipe: Recipe) -> float:
    """Top-1 with the prompt ensemble: s^I averaged over every prefix x suffix template."""
    ev, m = recipe.eval, recipe.model
    templates = [(p, s) for p in ev.prefixes for s in ev.suffixes]
    total = torch.zeros(len(labels), len(classes))
    for prefix, suffix in templates:
        prompts = [f"{prefix} {c}. {suffix}".strip() for c in classes]
        txt = encode_texts(model, prompts, m.text.context_length, ev.batch_size)
        s_i2t, _ = similarity(img, txt, m.interaction, m.similarity_memory_mb)
        total += s_i2t
    pred = (total / len(templates)).argmax(dim=1)
    return (pred == torch.tensor(labels)).float().mean().item()


def load_model(recipe: Recipe, pretrained: RunDir) -> FILIP:
    if not pretrained.model.is_file():
        raise JobError(f"{pretrained.model} not found: run the pretrain stage first")
    model = build_model(recipe.model)
    model.load_state_dict(torch.load(pretrained.model, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def evaluate(recipe: Recipe, run_dir: RunDir) -> dict[str, float]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    held_out = load_index(run_dir.input("data"))["eval"]
    if held_out is None:
        raise JobError("the recipe has no held-out split (data.eval is null): nothing to evaluate on")
    model = load_model(recipe, run_dir.input("pretrain"))
    m, ev = recipe.model, recipe.eval
    classes = held_out["classnames"]
    images, captions, labels = eval_set(held_out["shards"], m.image.image_size, with_labels=bool(classes))
    img = encode_images(model, images, ev.batch_size)
    txt = encode_texts(model, captions, m.text.context_length, ev.batch_size)
    s_i2t, s_t2i = similarity(img, txt, m.interaction, m.similarity_memory_mb)
    metrics: dict[str, float] = {}
    for k, v in recall_at(s_i2t, ev.recall_at).items():
        metrics[f"i2t_R{k}"] = v
    for k, v in recall_at(s_t2i.t(), ev.recall_at).items():
        metrics[f"t2i_R{k}"] = v
    if classes:
        metrics["zeroshot_top1"] = zero_shot_accuracy(model, img, labels, classes, recipe)
        metrics["chance_zeroshot_top1"] = 1.0 / len(classes)  # what guessing would score
    metrics["chance_R1"] = 1.0 / len(captions)
    metrics["eval_pairs"] = float(len(captions))
    return metrics


def run(recipe: Recipe, run_dir: RunDir) -> None:
    metrics = evaluate(recipe, run_dir)
    StageLogger(True).metrics(metrics)
    run_dir.eval_results.write_text(json.dumps(metrics, indent=1))
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
