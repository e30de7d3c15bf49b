"""The FILIP pre-training filters on a crafted set whose drops per rule are known in advance."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from filipctl.schema import FilterConfig
from jobs.data.filters import filter_shards, is_meaningless
from jobs.data.shards import ShardWriter, caption, iter_samples


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), ((w * 7) % 256, (h * 13) % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(text: str, size: tuple[int, int] = (256, 256), meta: dict | None = None) -> dict:
    return {"png": _png(*size), "txt": text, "json": {"key": "", "caption": text, **(meta or {})}}


ENGLISH = [
    "a red apple on the table", "a dog running on the beach", "a wooden house next to a quiet lake",
    "two children playing football in the park", "a bowl of soup with fresh bread",
    "an old bicycle leaning against a brick wall", "the skyline of a big city at night",
    "a woman reading a book in the garden",
]


def _crafted() -> tuple[list[dict], dict[str, int], list[str]]:
    """-> (samples, expected drops per rule, captions expected to be kept)."""
    s: list[dict] = []
    kept: list[str] = []
    # min_side (5): decoded header; original_* wins over the resized width/height; width/height alone;
    # a German caption that is too small counts under min_side (first rule); one "cat" repeat (below).
    s.append(_sample("a small picture of a garden", (150, 300)))
    s.append(_sample("a tall tower seen from below", (256, 256),
                     {"original_width": 120, "original_height": 500, "width": 256, "height": 256}))
    s.append(_sample("a field of sunflowers in summer", (256, 256), {"width": 199, "height": 400}))
    s.append(_sample("Ein roter Apfel auf dem Tisch", (100, 100)))
    # aspect (3): 700x220 > 3 decoded; 250x800 from the json; a meaningless caption on a wide image.
    s.append(_sample("a long panorama of mountains", (700, 220)))
    s.append(_sample("a narrow street between houses", (256, 256), {"original_width": 250, "original_height": 800}))
    s.append(_sample("IMG_1234.JPG", (1000, 210)))
    # Exactly 3.0 is not over the limit: kept.
    s.append(_sample("a lighthouse on a rocky coast", (300, 900)))
    kept.append("a lighthouse on a rocky coast")
    # meaningless (7)
    for t in ["img 0.jpg", "IMG_1234.JPG", "DSC00012", "image.png", "photo 3 jpeg", "", "12345 !!!"]:
        s.append(_sample(t))
    # language (6): clear German, French, Chinese sentences.
    for t in ["Ein Hund läuft am Strand", "Das ist ein schönes Haus am See", "Un chien court sur la plage",
              "Une pomme rouge sur la table", "一只狗在海滩上奔跑", "红色的苹果在桌子上"]:
        s.append(_sample(t))
    # A one-word English caption py3langid calls German at low confidence: kept (language_min_confidence).
    s.append(_sample("sunset"))
    kept.append("sunset")
    # repeated: 11 x the cat caption (case/space variants) -> all dropped: 1 counted under min_side
    # (it fails that first), 10 under repeated; 10 x the dog caption -> kept.
    cat = ["a cat sitting on a red sofa", "A cat sitting on a red sofa", "a  cat sitting on a RED sofa "]
    s.append(_sample(cat[0], (100, 100)))
    for i in range(10):
        s.append(_sample(cat[i % 3]))
    for _ in range(10):
        s.append(_sample("a brown dog playing in the snow"))
        kept.append("a brown dog playing in the snow")
    for t in ENGLISH:
        s.append(_sample(t))
        kept.append(t)
    expected = {"min_side": 5, "aspect": 3, "meaningless": 7, "language": 6, "repeated": 10}
    return s, expected, kept


def _write_input(root: Path, samples: list[dict]) -> str:
    with ShardWriter(str(root), samples_per_shard=16) as w:
        for smp in samples:
            w.write(smp)
    return f"{root}/{{00000..{len(w.shards) - 1:05d}}}.tar"


def test_filter_counts_and_output(tmp_path: Path) -> None:
    samples, expected, kept = _crafted()
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    samples = [samples[i] for i in order]
    kept_set = sorted(kept)
    # Unreadable: a sample whose image is garbage and whose size only the header could tell.
    samples.insert(5, {"png": b"not an image", "txt": "a broken image of a boat", "json": {"caption": "x"}})
    spec = _write_input(tmp_path / "in", samples)
    garbage = tmp_path / "in" / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)

    rules = FilterConfig(output=str(tmp_path / "out"), samples_per_shard=8)  # the paper's rules: the defaults
    report = filter_shards([spec, str(garbage)], str(tmp_path / "out"), rules)

    n_good = len(samples) - 1
    assert report["dropped"] == expected
    assert report["input"] == n_good
    assert report["kept"] == len(kept) == n_good - sum(expected.values())
    assert report["unreadable"] == 2
    assert any(str(garbage) in e for e in report["errors"])
    # The record the data stage compares to reuse a filtered copy: its form must not change.
    assert report["rules"] == {"min_side": 200, "max_aspect": 3.0, "language": "en", "max_repeats": 10,
                               "enabled": ["min_side", "aspect", "meaningless", "language", "repeated"],
                               "language_min_confidence": 0.5}
    assert json.loads((tmp_path / "out" / "filter_report.json").read_text()) == report

    errors: list = []
    out = list(iter_samples(report["shards"], on_error=lambda u, e: errors.append(e)))
    assert errors == []
    assert sorted(caption(x) for x in out) == kept_set
    # Kept samples are unchanged apart from their (renumbered) key, and in input order.
    by_caption = [smp for smp in samples if smp["txt"] in kept_set]
    assert [x["png"] for x in out] == [smp["png"] for smp in by_caption]
    assert all(json.loads(x["json"])["key"] == x["__key__"] for x in out)


def test_rules_turned_off_and_validation(tmp_path: Path) -> None:
    samples, _, _ = _crafted()
    spec = _write_input(tmp_path / "in", samples)
    # Thresholds nothing fails, and the language rule off: only the meaningless rule drops.
    rules = FilterConfig(output=str(tmp_path / "out"), min_side=0, max_aspect=100, max_repeats=100, language=None,
                         samples_per_shard=100)
    report = filter_shards(spec, str(tmp_path / "out"), rules)
    # The wide "IMG_1234.JPG" now counts as meaningless too.
    assert report["dropped"] == {"min_side": 0, "aspect": 0, "meaningless": 8, "repeated": 0}
    assert report["kept"] == len(samples) - 8
    assert report["rules"]["enabled"] == ["min_side", "aspect", "meaningless", "repeated"]
    with pytest.raises(ValueError, match="not one py3langid knows"):
        filter_shards(spec, str(tmp_path / "out2"), FilterConfig(output=str(tmp_path / "out2"), language="xx"))
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("text", ["img 0.jpg", "IMG_1234.JPG", "DSC00012", "image.png", "photo 3 jpeg", "", " ",
                                  "12345", "...", "my_holiday-01.jpeg", "P1010023", "screenshot 2021-01-01"])
def test_meaningless(text: str) -> None:
    assert is_meaningless(text)


@pytest.mark.parametrize("text", ["a photo of a dog", "image of a cat", "iPhone 12", "Windows 10", "R2D2",
                                  "sunset jpg", "一只狗", "photo of the day"])
def test_not_meaningless(text: str) -> None:
    assert not is_meaningless(text)
