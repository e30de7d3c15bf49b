"""Stream image-caption pairs from WebDataset shards at any fsspec URL (local path, s3://, ...)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
import torch
from torch import Tensor

from jobs.dataset import shard_urls
from models.tokenizer import tokenize

if TYPE_CHECKING:
    from filipctl.schema import Recipe


def _open_shards(urls: Iterator[str]) -> Iterator[dict[str, Any]]:
    # webdataset has no fsspec/s3 opener of its own: open each shard through fsspec.
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


def image_transform(image_size: int, augment: bool):
    from torchvision import transforms as T

    steps: list[Any] = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    if augment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    # CLIP's normalisation constants.
    steps += [T.ToTensor(), T.Normalize((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))]
    return T.Compose(steps)


def train_batches(recipe: "Recipe", manifest: dict[str, Any], rank: int, world_size: int,
                  start_epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images [b,3,H,W], token ids [b,L]) batches for one rank.

    Each epoch reshuffles the shard order with (seed, epoch); rank r reads every world_size-th
    sample, so ranks see disjoint data whatever the number of shards.
    """
    import webdataset as wds

    data, seed = recipe.data, recipe.train.seed
    batch_size, context_length = recipe.train.micro_batch_size, recipe.model.text.context_length
    shuffle_buffer = data.shuffle_buffer
    urls = shard_urls(data.url, "train", manifest["shards"]["train"])
    transform = image_transform(recipe.model.image.image_size, data.augment)
    epoch = start_epoch
    while True:
        order = list(urls)
        random.Random(f"{seed}/{epoch}").shuffle(order)
        samples = wds.tarfile_to_samples()(_open_shards(iter(order)))
        mine = (s for i, s in enumerate(samples) if i % world_size == rank)
        shuffled = wds.shuffle(shuffle_buffer, seed=seed * 1000 + epoch * 10 + rank)(mine) if shuffle_buffer else mine
        images: list[Tensor] = []
        texts: list[str] = []
        for sample in wds.decode("pil")(shuffled):
            images.append(transform(sample["png"].convert("RGB")))
            texts.append(sample["txt"])
            if len(images) == batch_size:
                yield torch.stack(images), tokenize(texts, context_length)
                images, texts = [], []
        epoch += 1


def eval_set(root: str, shard_names: list[str], image_size: int) -> tuple[Tensor, list[str], list[int]]:
    """The whole held-out split in order: images [N,3,H,W], captions, class labels."""
    import webdataset as wds

    transform = image_transform(image_size, augment=False)
    urls = shard_urls(root, "eval", shard_names)
    images, captions, labels = [], [], []
    for sample in wds.decode("pil")(wds.tarfile_to_samples()(_open_shards(iter(urls)))):
        images.append(transform(sample["png"].convert("RGB")))
        captions.append(sample["txt"])
        labels.append(int(sample["json"]["label"]))
    return torch.stack(images), captions, labels
