"""The FILIP paper's pre-training filters over image-caption shards.

FILIP (Yao et al. 2021, section "Data and augmentation") drops images whose shorter side is
under 200 px or whose aspect ratio exceeds 3, keeps English text only, drops meaningless text
(e.g. "img 0.jpg") and drops pairs whose text repeats more than 10 times. `filter_shards` applies
those rules to img2dataset-layout shards and writes the kept samples as new shards. The rules'
thresholds are the recipe's `data.filter` section (filipctl.schema.FilterConfig), documented there.

Each dropped sample is counted under the FIRST rule it fails, in the fixed order
min_side, aspect, meaningless, language, repeated, so the per-rule counts add up to the drops.
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from hashlib import blake2b
from typing import Any, Callable, Iterable

from filipctl.schema import FilterConfig
from jobs.data.report import write_report
from jobs.data.shards import ErrorLog, ShardWriter, caption, count_samples, expand_urls, image_key, iter_samples, metadata

RULES: tuple[str, ...] = ("min_side", "aspect", "meaningless", "language", "repeated")
MAX_ERRORS_REPORTED = 100
REPORT = "filter_report.json"


def enabled_rules(rules: FilterConfig) -> tuple[str, ...]:
    """The rules applied, in RULES order: `meaningless: false` and `language: null` turn theirs off."""
    return tuple(r for r in RULES if (r != "meaningless" or rules.meaningless) and (r != "language" or rules.language))


def rules_record(rules: FilterConfig) -> dict[str, Any]:
    """The rules as a report records them; the data stage reuses a filtered copy only when they match.

    Its form predates FilterConfig (language "en" when the rule is off): kept, so that copies filtered
    before still match.
    """
    return {"min_side": rules.min_side, "max_aspect": rules.max_aspect, "language": rules.language or "en",
            "max_repeats": rules.max_repeats, "enabled": list(enabled_rules(rules)),
            "language_min_confidence": rules.language_min_confidence}


def check_language(rules: FilterConfig) -> None:
    """Refuse, before anything is read, a language py3langid never answers: the rule would drop nearly every
    caption."""
    if "language" in enabled_rules(rules) and rules.language not in _identifier().labels:
        raise ValueError(f"language {rules.language!r} is not one py3langid knows; use an ISO 639-1 code such as 'en'")


# --- meaningless text -------------------------------------------------------------------------
# A caption is meaningless when it is empty, has no letters at all (only digits, punctuation,
# symbols, whitespace), or is a file name: a single token ending in an image extension
# ("my-holiday_01.jpg"), or a generic stem -- a camera/image word and/or a number, e.g.
# "img 0", "IMG_1234", "DSC00012", "image", "photo 3" -- optionally followed by an image extension
# after ".", "_", "-" or a space ("img 0.jpg", "photo 3 jpeg").
_EXT = r"(?:jpe?g|jpe|png|gif|webp|bmp|tiff?|heic|heif|avif|raw|cr2|nef|dng|svg)"
_WORD = r"(?:img|image|images|photo|photos|pic|pics|picture|dsc|dscn|dscf|dcim|screenshot|untitled|file|scan|pxl|gopr|mvi|sam|thumb|thumbnail)"
_NUM = r"\d+(?:[ _\-.]\d+)*"
_SEP = r"[ _\-.]?"
_GENERIC_STEM = rf"(?:{_WORD}{_SEP}(?:{_NUM})?|[a-z]{{0,4}}{_SEP}\d{{3,}}(?:[ _\-.]\d+)*|{_NUM})"
_FILE_NAME = re.compile(rf"^(?:\S+\.{_EXT}|{_GENERIC_STEM}(?:[ _\-.]{_EXT})?)$", re.IGNORECASE)


def is_meaningless(text: str) -> bool:
    """Empty, letter-free, or file-name-like captions (see the rule above)."""
    t = " ".join(text.split())
    if not t:
        return True
    if not any(unicodedata.category(ch).startswith("L") for ch in t):
        return True
    return _FILE_NAME.match(t) is not None


# --- language ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _identifier():
    """py3langid's model ships inside its wheel: no download, works offline."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, normalised probability) by py3langid."""
    lang, prob = _identifier().classify(text)
    return lang, float(prob)


# --- sizes and repeats ------------------------------------------------------------------------
def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def image_size(sample: dict[str, Any], meta: dict[str, Any]) -> tuple[int, int]:
    """(width, height): the json's original_width/height, else width/height, else the image header."""
    for wk, hk in (("original_width", "original_height"), ("width", "height")):
        w, h = _int_or_none(meta.get(wk)), _int_or_none(meta.get(hk))
        if w is not None and h is not None:
            return w, h
    ext = image_key(sample)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image (jpg/jpeg/png/webp)")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample[ext])) as im:  # reads the header only
            return im.size
    except Exception as exc:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: {ext} is not a readable image ({exc})") from exc


def normalise_caption(text: str) -> str:
    """Lowercased, whitespace collapsed: what 'the same caption' means for the repeat rule."""
    return " ".join(text.lower().split())


def _caption_id(text: str) -> bytes:
    # 8-byte digests keep the counting pass's memory at O(distinct captions), not their length.
    return blake2b(normalise_caption(text).encode("utf-8"), digest_size=8).digest()


def first_failed_rule(sample: dict[str, Any], rules: FilterConfig, repeats: Counter | None = None) -> str | None:
    """The first rule (in RULES order) the sample fails, or None to keep it. Raises ValueError if unreadable."""
    if image_key(sample) is None:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image (jpg/jpeg/png/webp)")
    meta = metadata(sample)
    text = caption(sample)
    on = set(enabled_rules(rules))
    if "min_side" in on or "aspect" in on:
        w, h = image_size(sample, meta)
        if "min_side" in on and min(w, h) < rules.min_side:
            return "min_side"
        if "aspect" in on and (min(w, h) <= 0 or max(w, h) / min(w, h) > rules.max_aspect):
            return "aspect"
    if "meaningless" in on and is_meaningless(text):
        return "meaningless"
    if "language" in on:
        lang, prob = detect_language(text)
        if lang != rules.language and prob >= rules.language_min_confidence:
            return "language"
    if "repeated" in on and repeats is not None and repeats[_caption_id(text)] > rules.max_repeats:
        return "repeated"
    return None


def _count_captions(urls: list[str]) -> tuple[Counter, int]:
    """First pass: how often each normalised caption occurs across all the input."""
    counts: Counter = Counter()
    n = 0
    for sample in iter_samples(urls, on_error=lambda url, exc: None):  # the second pass reports errors
        try:
            counts[_caption_id(caption(sample))] += 1
        except ValueError:
            continue
        n += 1
    return counts, n


def filter_shards(
    input_urls: str | Iterable[str],
    output_url: str,
    rules: FilterConfig,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Write the samples of `input_urls` that pass `rules` as shards under `output_url` -> the report.

    `output_url` rather than `rules.output`: the data stage gives each training source a folder of its own
    in it. The report {"input", "kept", "dropped": {rule: n}, "unreadable", "rules", "shards", "errors",
    "inputs"} is also written to `output_url/filter_report.json`. "input" counts readable samples;
    "unreadable" counts the damaged shards and samples reported while reading (their first 100 in
    "errors"); "inputs" lists the shards read. The repeat rule counts captions over the whole input (a
    first pass), dropped ones included.
    """
    check_language(rules)
    enabled = enabled_rules(rules)
    urls = expand_urls(input_urls)
    repeats: Counter | None = None
    total: int | None = count_samples(urls)
    if "repeated" in enabled:
        repeats, total = _count_captions(urls)

    on_error = ErrorLog(MAX_ERRORS_REPORTED)

    dropped = {r: 0 for r in enabled}
    n_in = kept = 0
    with ShardWriter(output_url, samples_per_shard=rules.samples_per_shard) as writer:
        for sample in iter_samples(urls, on_error=on_error):
            try:
                failed = first_failed_rule(sample, rules, repeats)
                meta = metadata(sample) if "json" in sample else None
            except ValueError as exc:
                on_error(sample["__url__"], exc)
                continue
            n_in += 1
            if failed is None:
                writer.write({**sample, "json": meta} if meta is not None else sample)
                kept += 1
            else:
                dropped[failed] += 1
            if progress is not None:
                progress(n_in, total)
    report = {
        "input": n_in,
        "kept": kept,
        "dropped": dropped,
        "unreadable": on_error.count,
        "rules": rules_record(rules),
        "shards": writer.pattern(),
        "errors": on_error.messages,
        "inputs": urls,
    }
    write_report(output_url, REPORT, report)
    return report
