"""Tiny evaluation sets in clip_benchmark's WebDataset layout, written with plain tarfile (not filipctl's writer).

The images are the shapes generator's; classification labels are the largest shape's "colour shape"
class; retrieval images get several captions (the caption and its paraphrases).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from jobs.data.synthetic import CLASSES, make_sample


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image(jpeg: bytes, fmt: str) -> bytes:
    if fmt == "jpg":
        return jpeg
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="webp" if fmt == "webp" else "png", **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def write_split(folder: Path, samples: list[dict[str, bytes]], per_shard: int, nshards_file: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, shard in enumerate(shards):
        with tarfile.open(folder / f"{n}.tar", "w") as tar:
            for i, sample in enumerate(shard):
                key = f"s{n * per_shard + i:07d}"
                for ext, data in sample.items():
                    _add(tar, f"{key}.{ext}", data)
    if nshards_file:
        (folder / "nshards.txt").write_text(f"{len(shards)}\n")


def classification_set(root: Path, sizes: dict[str, int], image_size: int = 64, fmt: str = "webp",
                       templates: list[str] | None = None, per_shard: int = 16, seed: int = 7) -> list[str]:
    """-> the class names; root/{classnames.txt, zeroshot_classification_templates.txt, SPLIT/n.tar}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    for split, n in sizes.items():
        samples = []
        for i in range(n):
            jpeg, _, meta = make_sample(seed, split, i, image_size, 2)
            samples.append({fmt: _image(jpeg, fmt), "cls": str(meta["label"]).encode()})
        write_split(root / split, samples, per_shard)
    return CLASSES


def retrieval_set(root: Path, n: int, image_size: int = 64, captions_per_image: int = 3, fmt: str = "png",
                  per_shard: int = 16, seed: int = 11) -> list[list[str]]:
    """-> each image's captions; root/{dataset_type.txt = retrieval, test/n.tar with .png + .txt}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    samples, captions = [], []
    for i in range(n):
        jpeg, caption, meta = make_sample(seed, "test", i, image_size, 2)
        caps = ([caption] + meta["alt_captions"])[:captions_per_image]
        captions.append(caps)
        samples.append({fmt: _image(jpeg, fmt), "txt": "\n".join(caps).encode()})
    write_split(root / "test", samples, per_shard)
    return captions
