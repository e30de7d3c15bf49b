"""A deterministic coloured-shapes image-caption set with fine-grained structure, as WebDataset shards.

Each image holds 1..max_objects shapes of distinct colours in distinct cells of a 3x3 grid;
its caption names colour, shape and position of each ("a red circle at the top left and a
blue square at the bottom"). The class label is the largest shape's "colour shape" (for
zero-shot classification) and every shape's box is kept in the metadata. Sample i of a
split depends only on (seed, split, i), so the same seed gives byte-identical shards.

Layout under the dataset root (any fsspec URL):
    train/shard-000000.tar ...   eval/shard-000000.tar ...   dataset.json (written last)
"""

from __future__ import annotations

import io
import json
import random
from typing import TYPE_CHECKING, Any, Callable

import fsspec
from PIL import Image, ImageDraw

from jobs.dataset import MANIFEST, read_manifest

if TYPE_CHECKING:
    from filipctl.schema import SyntheticData

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# 3x3 grid cells, row-major; the phrase is how a caption names the cell.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
FORMAT_VERSION = 1


def _position_phrase(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def make_sample(seed: int, split: str, index: int, image_size: int, max_objects: int) -> tuple[bytes, str, dict[str, Any]]:
    """-> (PNG bytes, caption, metadata) for sample `index` of `split`."""
    rng = random.Random(f"{seed}/{split}/{index}")
    n = rng.randint(1, max_objects)
    colours = rng.sample(list(COLOURS), n)
    cells = rng.sample(range(9), n)
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    # Sizes as a fraction of a grid cell, the first (labelled) shape largest.
    sizes = sorted((rng.uniform(0.55, 0.95) for _ in range(n)), reverse=True)

    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (image_size, image_size), bg)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    objects = []
    for colour, shape, c, frac in zip(colours, shapes, cells, sizes):
        row, col = divmod(c, 3)
        half = frac * cell / 2
        cx = (col + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        objects.append({"colour": colour, "shape": shape, "position": POSITIONS[c], "box": box})

    caption = " and ".join(f"a {o['colour']} {o['shape']} {_position_phrase(o['position'])}" for o in objects)
    label_name = f"{objects[0]['colour']} {objects[0]['shape']}"
    meta = {"label": CLASSES.index(label_name), "label_name": label_name, "objects": objects}
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), caption, meta


def generate(url: str, cfg: "SyntheticData", progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the dataset at `url` unless a manifest with the same parameters is already there."""
    import webdataset as wds

    # Every generator setting is in the manifest: a new setting regenerates, whatever its name.
    params = {"format_version": FORMAT_VERSION, **cfg.model_dump(mode="json")}
    existing = read_manifest(url)
    if existing is not None and existing.get("params") == params:
        return existing

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # parameters changed: the old manifest no longer describes the shards
    total = cfg.train_samples + cfg.eval_samples
    done = 0
    shards: dict[str, list[str]] = {}
    for split, count in (("train", cfg.train_samples), ("eval", cfg.eval_samples)):
        fs.makedirs(f"{root}/{split}", exist_ok=True)
        names = []
        for shard_idx, start in enumerate(range(0, count, cfg.samples_per_shard)):
            name = f"shard-{shard_idx:06d}.tar"
            with fs.open(f"{root}/{split}/{name}", "wb") as raw:
                # mtime fixed so that the same seed gives byte-identical tar files.
                with wds.TarWriter(raw, mtime=0.0) as sink:
                    for i in range(start, min(start + cfg.samples_per_shard, count)):
                        png, caption, meta = make_sample(cfg.seed, split, i, cfg.image_size, cfg.max_objects)
                        sink.write({"__key__": f"{split}-{i:08d}", "png": png, "txt": caption, "json": meta})
                        done += 1
                        if progress:
                            progress(done, total)
            names.append(name)
        shards[split] = names

    manifest = {"params": params, "classes": CLASSES, "shards": shards,
                "counts": {"train": cfg.train_samples, "eval": cfg.eval_samples}}
    # The manifest is written last: its presence means every shard is complete.
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
