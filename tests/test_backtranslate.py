"""Back-translation through two pivots, on the real backtranslate_shards code path.

No real translation model (Helsinki-NLP/opus-mt-*) can be fetched here, so the test BUILDS tiny
randomly initialised MarianMT models as stand-ins: a tiny MarianConfig, a SentencePiece model
trained on a handful of sentences, a vocab.json, all saved with save_pretrained into tmp_path.
Their "translations" are noise; what is checked is the plumbing: loading from local paths only,
batching, greedy determinism, and how alt_captions land in the output shards.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from jobs.data import backtranslate
from jobs.data.backtranslate import backtranslate_shards
from jobs.data.shards import ShardWriter, caption, iter_samples, metadata

SENTENCES = [
    "a red apple on the table", "a dog running on the beach", "a wooden house next to a lake",
    "two children playing football", "ein roter apfel auf dem tisch", "ein hund läuft am strand",
    "красное яблоко на столе", "собака бежит по пляжу", "the skyline of a city at night",
]


def _tiny_marian(path: Path, seed: int) -> str:
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=60, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    path.mkdir(parents=True)
    (path / "source.spm").write_bytes(buf.getvalue())
    (path / "target.spm").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tokens = ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")] + ["<pad>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    tok = MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"))
    tok.save_pretrained(path)
    pad = len(tokens) - 1
    config = MarianConfig(
        vocab_size=len(tokens), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad, forced_eos_token_id=0,
    )
    torch.manual_seed(seed)
    MarianMTModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pivots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("marian")
    return {
        "de": (_tiny_marian(root / "en-de", 1), _tiny_marian(root / "de-en", 2)),
        "ru": (_tiny_marian(root / "en-ru", 3), _tiny_marian(root / "ru-en", 4)),
    }


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 20 % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _input(root: Path) -> tuple[str, list[dict]]:
    samples = [{"png": _png(i), "txt": SENTENCES[i % len(SENTENCES)] + f" number {i}",
                "json": {"key": "", "caption": "x", "url": f"http://example/{i}"}} for i in range(11)]
    samples[3]["json"]["alt_captions"] = []  # an existing (empty) list is extended
    samples[7]["txt"] = "   "  # blank: nothing to translate
    with ShardWriter(str(root), samples_per_shard=4) as w:
        for s in samples:
            w.write(s)
    return f"{root}/{{00000..00002}}.tar", samples


def test_backtranslate_two_pivots(tmp_path: Path, pivots: dict[str, tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import MarianMTModel, MarianTokenizer

    loads: list[tuple[str, str, dict]] = []
    for cls in (MarianMTModel, MarianTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _orig=original, **kwargs):
            loads.append((klass.__name__, str(path), kwargs))
            return _orig(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    spec, samples = _input(tmp_path / "in")
    outs = []
    for run in ("a", "b"):
        report = backtranslate_shards(spec, str(tmp_path / run), pivots, batch_size=4, samples_per_shard=5,
                                      max_new_tokens=6)
        assert report["input"] == report["written"] == len(samples) and report["unreadable"] == 0
        assert json.loads((tmp_path / run / "backtranslate_report.json").read_text()) == report
        outs.append(list(iter_samples(report["shards"], on_error=lambda u, e: pytest.fail(f"{u}: {e}"))))

    # Models come from the given local directories only, never from the hub.
    model_dirs = {p for pair in pivots.values() for p in pair}
    assert {p for _, p, _ in loads} == model_dirs and len(loads) == 2 * 2 * len(model_dirs)
    assert all(kw.get("local_files_only") is True for _, _, kw in loads)

    a, b = outs
    assert len(a) == len(samples)
    for out, orig in zip(a, samples):
        meta = metadata(out)
        alts = meta["alt_captions"]
        assert isinstance(alts, list) and len(alts) == 2 and all(isinstance(t, str) for t in alts)
        assert caption(out) == orig["txt"] and out["png"] == orig["png"]
        assert meta["url"] == orig["json"]["url"] and meta["key"] == out["__key__"]
    assert metadata(a[7])["alt_captions"] == ["   ", "   "]
    # Greedy decoding: the same input gives the same captions.
    assert [metadata(x)["alt_captions"] for x in a] == [metadata(x)["alt_captions"] for x in b]


def test_missing_model_dir_is_a_clear_error(tmp_path: Path, pivots: dict[str, tuple[str, str]]) -> None:
    spec, _ = _input(tmp_path / "in")
    bad = {"de": pivots["de"], "ru": (str(tmp_path / "nowhere"), pivots["ru"][1])}
    with pytest.raises(OSError, match="local paths only"):
        backtranslate_shards(spec, str(tmp_path / "out"), bad)
    with pytest.raises(ValueError, match="pivots is empty"):
        backtranslate_shards(spec, str(tmp_path / "out"), {})
    assert backtranslate.ALT_CAPTIONS == "alt_captions"


def test_lengths_capped_to_the_model(pivots: dict[str, tuple[str, str]]) -> None:
    """A long caption and a generous max_new_tokens stay within the model's position table (64 here)."""
    t = backtranslate.Translator(pivots["de"][0], max_new_tokens=500)
    assert t.max_new_tokens == 63 and t.max_input_tokens == 64
    out = t([" ".join(SENTENCES * 3), "a dog"])
    assert len(out) == 2 and all(isinstance(x, str) for x in out)
