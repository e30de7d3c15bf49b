"""Back-translated alternative captions (FILIP's text augmentation) written into new shards.

FILIP back-translates each caption through German and Russian and, at each step, trains on one of
the original and its two back-translations. Here each caption is translated en -> pivot -> en with
MarianMT models loaded from LOCAL directories only (nothing is downloaded at run time), greedily
(num_beams=1, no sampling) so reruns give the same text. The results are appended, one per pivot
in the order of `pivots`, to the list under "alt_captions" in the sample's json: the loader reads
that key, and with text augmentation on each draw picks one of the original and its alternatives.
All other members are copied unchanged (the json's "key" follows the new shard key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from jobs.data.report import write_report
from jobs.data.shards import ErrorLog, ShardWriter, caption, count_samples, expand_urls, iter_samples, metadata

ALT_CAPTIONS = "alt_captions"
MAX_ERRORS_REPORTED = 100
REPORT = "backtranslate_report.json"


class Translator:
    """One MarianMT direction (tokenizer + model) from a local directory."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 128) -> None:
        from transformers import MarianMTModel, MarianTokenizer

        if not Path(path).is_dir():
            raise OSError(f"no MarianMT model directory at {path!r}: models are loaded from local paths only; "
                          "download e.g. Helsinki-NLP/opus-mt-en-de elsewhere and copy the folder here")
        try:
            self.tokenizer = MarianTokenizer.from_pretrained(path, local_files_only=True)
            self.model = MarianMTModel.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise OSError(f"cannot load a MarianMT model from {path!r} ({exc}); it needs config.json, the weights, "
                          "source.spm, target.spm and vocab.json as save_pretrained writes them") from exc
        self.path = path
        self.device = device
        # Positions past the model's table raise IndexError inside generate: cap input and output.
        positions = int(getattr(self.model.config, "max_position_embeddings", 512))
        self.max_input_tokens = min(positions, int(self.tokenizer.model_max_length or positions))
        self.max_new_tokens = max(1, min(max_new_tokens, positions - 1))

    def __call__(self, texts: list[str]) -> list[str]:
        """Translate a batch, greedily (deterministic)."""
        import torch

        if not texts:
            return []
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_input_tokens)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = self.model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _check_pivots(pivots: dict[str, tuple[str, str]]) -> None:
    if not pivots:
        raise ValueError("pivots is empty; give e.g. {'de': ('/models/opus-mt-en-de', '/models/opus-mt-de-en')}")
    for lang, pair in pivots.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pivot {lang!r}: expected (en->{lang} model path, {lang}->en model path), got {pair!r}")


def backtranslate_shards(
    input_urls: str | Iterable[str],
    output_url: str,
    pivots: dict[str, tuple[str, str]],
    batch_size: int = 32,
    samples_per_shard: int = 10000,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    device: str = "cpu",
    max_new_tokens: int = 128,
) -> dict[str, Any]:
    """Copy the shards to `output_url`, appending one back-translation per pivot to each "alt_captions".

    `pivots` maps a pivot language to (en->pivot model dir, pivot->en model dir). A blank caption
    gets itself as its alternatives (there is nothing to translate). Unreadable shards and samples
    are reported and skipped. Returns {"input", "written", "unreadable", "pivots", "shards", "errors"},
    also written to `output_url/backtranslate_report.json`.
    """
    _check_pivots(pivots)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    urls = expand_urls(input_urls)
    models = {lang: (Translator(fwd, device, max_new_tokens), Translator(back, device, max_new_tokens))
              for lang, (fwd, back) in pivots.items()}
    total = count_samples(urls)

    on_error = ErrorLog(MAX_ERRORS_REPORTED)

    n_in = 0
    batch: list[tuple[dict[str, Any], str, dict[str, Any]]] = []

    def flush(writer: ShardWriter) -> None:
        texts = [c for _, c, _ in batch]
        todo = [i for i, c in enumerate(texts) if c.strip()]
        alts: list[list[str]] = [[] for _ in batch]
        for lang, (to_pivot, from_pivot) in models.items():
            back = from_pivot(to_pivot([texts[i] for i in todo]))
            got = dict(zip(todo, back))
            for i in range(len(batch)):
                alts[i].append(got.get(i, texts[i]))
        for (sample, _, meta), extra in zip(batch, alts):
            writer.write({**sample, "json": {**meta, ALT_CAPTIONS: [*meta.get(ALT_CAPTIONS, []), *extra]}})
        if progress is not None:
            progress(n_in, total)
        batch.clear()

    with ShardWriter(output_url, samples_per_shard=samples_per_shard) as writer:
        for sample in iter_samples(urls, on_error=on_error):
            try:
                text = caption(sample)
                meta = metadata(sample)
                if not isinstance(meta.get(ALT_CAPTIONS, []), list):
                    raise ValueError(f"sample {sample['__key__']!r}: json {ALT_CAPTIONS!r} is not a list")
            except ValueError as exc:
                on_error(sample["__url__"], exc)
                continue
            n_in += 1
            batch.append((sample, text, meta))
            if len(batch) >= batch_size:
                flush(writer)
        if batch:
            flush(writer)

    report = {
        "input": n_in,
        "written": writer.written,
        "unreadable": on_error.count,
        "pivots": {lang: list(pair) for lang, pair in pivots.items()},
        "shards": writer.pattern(),
        "errors": on_error.messages,
    }
    write_report(output_url, REPORT, report)
    return report
