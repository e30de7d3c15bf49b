"""img2dataset-layout shards: written by ShardWriter, read back by iter_samples, damage reported not raised."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from jobs.data.shards import ShardWriter, caption, count_samples, expand_urls, image_key, iter_samples, metadata


def _png(w: int, h: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    return [
        {"jpg": _png(8 + i, 8), "txt": f"caption number {i}",
         "json": {"key": "old", "caption": f"caption number {i}", "width": 8 + i, "height": 8, "url": f"http://x/{i}"}}
        for i in range(n)
    ]


def _write(out: Path | str, samples: list[dict], per_shard: int) -> list[str]:
    with ShardWriter(str(out), samples_per_shard=per_shard) as w:
        for s in samples:
            w.write(s)
    return w.shards


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_expand_urls() -> None:
    assert expand_urls("s3://b/cc3m/{00000..00002}.tar") == [f"s3://b/cc3m/0000{i}.tar" for i in range(3)]
    assert expand_urls(["/d/{0..1}.tar", "/e/x.tar"]) == ["/d/0.tar", "/d/1.tar", "/e/x.tar"]
    with pytest.raises(ValueError, match="brace pattern"):
        expand_urls("")


def test_write_read_roundtrip(tmp_path: Path) -> None:
    samples = _samples(7)
    shards = _write(tmp_path / "out", samples, per_shard=3)
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list((tmp_path / "out").glob("*.partial"))
    stats = json.loads((tmp_path / "out" / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 1 and stats["failed_to_download"] == 0 and stats["failed_to_resize"] == 0

    errors: list = []
    got = list(iter_samples(f"{tmp_path}/out/{{00000..00002}}.tar", on_error=lambda u, e: errors.append((u, e))))
    assert errors == []
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "000000002", "000010000", "000010001", "000010002", "000020000"]
    assert got[4]["__url__"] == f"{tmp_path}/out/00001.tar"
    for s, orig in zip(got, samples):
        assert image_key(s) == "jpg" and s["jpg"] == orig["jpg"]
        assert caption(s) == orig["txt"]
        meta = metadata(s)
        assert meta["key"] == s["__key__"] and meta["url"] == orig["json"]["url"]
    assert count_samples(f"{tmp_path}/out/{{00000..00002}}.tar") == 7
    (tmp_path / "out" / "00001_stats.json").unlink()
    assert count_samples(f"{tmp_path}/out/{{00000..00002}}.tar") is None


def test_byte_identical(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", _samples(5), per_shard=2)
    b = _write(tmp_path / "b", _samples(5), per_shard=2)
    assert [_digest(Path(x)) for x in a] == [_digest(Path(x)) for x in b]


def test_truncated_shard_reports_and_keeps_earlier_samples(tmp_path: Path) -> None:
    _write(tmp_path / "out", _samples(6), per_shard=3)
    shard = tmp_path / "out" / "00000.tar"
    data = shard.read_bytes()
    # Cut inside the third sample's image: the first two samples are complete.
    with tarfile.open(shard) as t:
        third = [m for m in t.getmembers() if m.name.startswith("000000002")][0]
    shard.write_bytes(data[: third.offset_data + 10])

    errors: list = []
    got = list(iter_samples(f"{tmp_path}/out/{{00000..00001}}.tar", on_error=lambda u, e: errors.append((u, e))))
    assert [s["__key__"] for s in got] == ["000000000", "000000001", "000010000", "000010001", "000010002"]
    assert len(errors) == 1 and errors[0][0] == str(shard)


def test_truncated_at_member_boundary_and_corrupt_header(tmp_path: Path) -> None:
    _write(tmp_path / "out", _samples(6), per_shard=3)
    a, b = tmp_path / "out" / "00000.tar", tmp_path / "out" / "00001.tar"
    with tarfile.open(a) as t:
        members = t.getmembers()
    # a: cut exactly where the 3rd sample's first member header starts (tarfile alone would end silently).
    a.write_bytes(a.read_bytes()[: members[6].offset])
    # b: garble the header of the 3rd sample's first member (tarfile alone would end silently too).
    raw = bytearray(b.read_bytes())
    raw[members[6].offset : members[6].offset + 512] = b"\x7f" * 512
    b.write_bytes(bytes(raw))

    errors: list = []
    got = list(iter_samples([str(a), str(b), str(tmp_path / "missing.tar")], on_error=lambda u, e: errors.append((u, e))))
    # The sample in progress when the damage shows (the 2nd: it may lack members) is dropped.
    assert [s["__key__"] for s in got] == ["000000000", "000010000"]
    assert [u for u, _ in errors] == [str(a), str(b), str(tmp_path / "missing.tar")]
    assert "end-of-archive" in str(errors[0][1]) and "corrupt tar header" in str(errors[1][1])


def test_any_fsspec_url() -> None:
    """memory:// stands in for s3:// (same fsspec code path: open, mv, stats beside the shard)."""
    import fsspec

    _write("memory://filip-shards/out", _samples(3), per_shard=2)
    fs = fsspec.filesystem("memory")
    assert sorted(Path(p).name for p in fs.ls("/filip-shards/out", detail=False)) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    got = list(iter_samples("memory://filip-shards/out/{00000..00001}.tar", on_error=lambda u, e: pytest.fail(f"{u}: {e}")))
    assert [caption(s) for s in got] == [f"caption number {i}" for i in range(3)]
    assert count_samples("memory://filip-shards/out/{00000..00001}.tar") == 3
    fs.rm("/filip-shards", recursive=True)
