"""A deterministic coloured-shapes image-caption set with fine-grained structure, in img2dataset's layout.

Each image holds 1..max_objects shapes of distinct colours in distinct cells of a 3x3 grid;
its caption names colour, shape and position of each ("a red circle at the top left and a
blue square at the bottom"). The class label is the largest shape's "colour shape" (for
zero-shot classification) and every shape's box is kept in the metadata, with two paraphrases
of the caption as `alt_captions` (the stand-in for back-translated captions). Sample i of a
split depends only on (seed, split, i), so the same seed gives byte-identical shards.

Written like any img2dataset download, so it is one more source for the loader:
    TRAIN/00000.tar 00000_stats.json ...        (KEY.jpg, KEY.txt, KEY.json)
    EVAL/00000.tar 00000_stats.json ... classnames.txt
    TRAIN/generator.json                        (the settings; written last: the set is complete)
"""

from __future__ import annotations

import io
import json
import random
from typing import TYPE_CHECKING, Any, Callable

import fsspec
from PIL import Image, ImageDraw

from jobs.data.shards import ShardWriter

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
FORMAT_VERSION = 2
GENERATOR = "generator.json"
CLASSNAMES = "classnames.txt"


def _position_phrase(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def caption_of(objects: list[dict[str, Any]]) -> str:
    """The caption naming each object's colour, shape and position, in order."""
    return " and ".join(f"a {o['colour']} {o['shape']} {_position_phrase(o['position'])}" for o in objects)


def paraphrases(objects: list[dict[str, Any]]) -> list[str]:
    """Two rewordings of the caption, as back-translation would give (same facts, other words)."""
    first = " and ".join(f"there is a {o['colour']} {o['shape']} {_position_phrase(o['position'])}" for o in objects)
    second = ", ".join(f"{o['position']}: {o['colour']} {o['shape']}" for o in objects)
    return [first, second]


def make_sample(seed: int, split: str, index: int, image_size: int, max_objects: int) -> tuple[bytes, str, dict[str, Any]]:
    """-> (JPEG bytes, caption, metadata) for sample `index` of `split`."""
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

    caption = caption_of(objects)
    label_name = f"{objects[0]['colour']} {objects[0]['shape']}"
    meta = {"caption": caption, "label": CLASSES.index(label_name), "label_name": label_name, "objects": objects,
            "alt_captions": paraphrases(objects), "width": image_size, "height": image_size,
            "original_width": image_size, "original_height": image_size, "status": "success"}
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), caption, meta


def _read_json(url: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def generate(train_url: str, eval_url: str, cfg: "SyntheticData",
             progress: Callable[[int, int], None] | None = None) -> bool:
    """Write the set into the two folders unless it is there with the same settings -> whether it wrote."""
    # Every generator setting is recorded: a new setting regenerates, whatever its name.
    params = {"format_version": FORMAT_VERSION, **cfg.model_dump(mode="json")}
    marker = f"{train_url.rstrip('/')}/{GENERATOR}"
    existing = _read_json(marker)
    if existing == params:
        return False
    fs, path = fsspec.core.url_to_fs(marker)
    if fs.exists(path):
        fs.rm(path)  # settings changed: the old marker no longer describes the shards
    total = cfg.train_samples + cfg.eval_samples
    done = 0
    for split, url, count in (("train", train_url, cfg.train_samples), ("eval", eval_url, cfg.eval_samples)):
        fs, folder = fsspec.core.url_to_fs(url)
        for old in fs.glob(folder.rstrip("/") + "/*.tar") + fs.glob(folder.rstrip("/") + "/*_stats.json"):
            fs.rm(old)  # a smaller set must not leave shards of the last one behind
        with ShardWriter(url, cfg.samples_per_shard) as sink:
            for i in range(count):
                image, caption, meta = make_sample(cfg.seed, split, i, cfg.image_size, cfg.max_objects)
                sink.write({"jpg": image, "txt": caption, "json": {"key": "", **meta}})
                done += 1
                if progress:
                    progress(done, total)
    with fsspec.open(f"{eval_url.rstrip('/')}/{CLASSNAMES}", "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    # Written last: its presence means every shard is complete.
    with fsspec.open(marker, "w") as f:
        json.dump(params, f, indent=1)
    return True
