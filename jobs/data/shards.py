"""Image-caption shards in the layout img2dataset writes, read and written through fsspec.

A shard is `{shard:05d}.tar` holding `KEY.jpg` (or jpeg/png/webp), `KEY.txt` (the caption) and
`KEY.json` (url, caption, key, width, height, original_width, original_height, ...), with
`{shard:05d}_stats.json` beside it (count, successes, failed_to_download, failed_to_resize).
Users name shards with brace patterns (`s3://bucket/cc3m/{00000..00331}.tar`). Shards are
opened with fsspec because webdataset has no s3 opener of its own.

Reading never raises on damaged data: a shard that cannot be opened, a truncated tar or a
corrupt header is reported through `on_error(url, exc)` and reading goes on with the next
shard, after yielding every complete sample that came before the damage.

The data stage records each shard's digest (`shard_digest`); `DigestCheck` compares a shard with it
before its first sample is read, so a shard changed since is skipped whole rather than noticed after
its samples were trained on.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from filipctl.contract import file_sha256

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OnError = Callable[[str, Exception], None]
# A valid tar ends with two zero blocks; python and GNU tar pad to a 20-block record after them.
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
_TAIL_WINDOW = 64 * 1024
_MTIME = 0  # fixed, so that the same samples give byte-identical shards


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Brace patterns (`/data/{000..002}.tar`), or a list of them -> the shard URLs, in order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"shard spec {s!r} is not a URL or brace pattern; give e.g. '/data/{{00000..00009}}.tar'")
        urls.extend(braceexpand(s.strip()))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards; give e.g. 's3://bucket/cc3m/{{00000..00331}}.tar'")
    return urls


class _CountingReader:
    """Counts the bytes read through it and keeps the last ones, to check how a tar ended."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        self.tail += data
        if len(self.tail) > 2 * _TAIL_WINDOW:
            del self.tail[: len(self.tail) - _TAIL_WINDOW]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def bytes_at(self, offset: int, n: int) -> bytes | None:
        start = offset - (self.count - len(self.tail))
        if start < 0:
            return None
        return bytes(self.tail[start : start + n])


def _check_end(reader: _CountingReader, tar: tarfile.TarFile) -> None:
    """tarfile stops silently on a truncated or invalid header after the first member: tell those apart
    from a proper end-of-archive marker."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return  # compressed: the byte counts are of the compressed stream; trust tarfile
    reader.drain()
    trailing = reader.count - tar.offset
    if trailing < _END_OF_ARCHIVE:
        raise tarfile.ReadError(
            f"truncated tar: no end-of-archive marker after byte {tar.offset} of {reader.count}"
        )
    head = reader.bytes_at(tar.offset, _END_OF_ARCHIVE)
    if head is None or head != bytes(_END_OF_ARCHIVE):
        raise tarfile.ReadError(f"corrupt tar header at byte {tar.offset} of {reader.count}")


def _iter_shard(url: str, on_error: OnError) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] | None = None
    try:
        with fsspec.open(url, "rb") as raw:
            reader = _CountingReader(raw)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    prefix, ext = base_plus_ext(info.name)
                    if prefix is None or ext is None:
                        on_error(url, ValueError(f"tar member {info.name!r} has no KEY.EXT name; skipped"))
                        continue
                    if posixpath.basename(prefix).startswith("__") and prefix.endswith("__"):
                        continue  # webdataset-style metadata members
                    if current is not None and current["__key__"] != prefix:
                        # A new key's header proves the previous sample complete: hand it out
                        # before reading on, so damage further on cannot take it away.
                        yield current
                        current = None
                    data = tar.extractfile(info).read()
                    tar.members = []  # stream mode keeps every TarInfo otherwise
                    if current is None:
                        current = {"__key__": prefix, "__url__": url}
                    if ext in current:
                        on_error(url, ValueError(f"sample {prefix!r} has two {ext!r} members; the later one is kept"))
                    current[ext] = data
                _check_end(reader, tar)
    except Exception as exc:  # damaged or unreachable shard: report, keep what was complete
        # The sample being read when the damage showed may be missing members: drop it.
        on_error(url, exc)
        return
    if current is not None:
        yield current


class ErrorLog:
    """An `on_error` for the shard tools: counts every damaged shard or sample, keeps the first messages."""

    def __init__(self, keep: int = 100) -> None:
        self.count = 0
        self.messages: list[str] = []
        self.keep = keep

    def __call__(self, url: str, exc: Exception) -> None:
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(f"{url}: {type(exc).__name__}: {exc}")


def iter_samples(urls: str | Iterable[str], *, on_error: OnError) -> Iterator[dict[str, Any]]:
    """Every sample of the shards, in order: {"__key__", "__url__", ext: raw bytes, ...}.

    Damaged shards never raise: `on_error(url, exc)` is called and reading goes on with the next
    shard. A sample is complete once the next member's header shows another key, or at a proper
    end of archive; so a damaged shard yields every sample before the damage, and the one being
    read when the damage showed (it may lack members) is dropped.
    """
    for url in expand_urls(urls):
        yield from _iter_shard(url, on_error)


def _local_path(url: str) -> str | None:
    path = url.removeprefix("file://")
    return None if "://" in path else path


def shard_digest(url: str) -> str:
    """A shard's identity: "sha256:HEX" of a local file's bytes, the object store's ETag ("etag:...") for a
    remote one (reading remote data whole to hash it would cost a download; the ETag changes with the bytes),
    or "size:N:modified:T" where the store has no ETag."""
    path = _local_path(url)
    if path is not None:
        return "sha256:" + file_sha256(Path(path))
    fs, remote = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(remote)  # a listing cached in this process would hide a newer object
    info = fs.info(remote)
    tag = info.get("ETag") or info.get("etag") or info.get("md5") or ""
    when = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return f"etag:{str(tag).strip(chr(34))}" if tag else f"size:{info.get('size')}:modified:{when}"


def _short(digest: str) -> str:
    kind, _, value = digest.partition(":")
    return value[:16] if kind == "sha256" else value


class DigestCheck:
    """Is a shard still the one the data stage indexed? Checked before its first sample is read.

    A local shard is hashed whole before reading (the tar read after it comes from the page cache); hashing
    while streaming would notice a change only after the shard's samples were trained on. To keep that to
    one hash per shard and process, a later open (the next epoch) re-hashes only when the file's size or
    mtime moved. A remote shard costs one metadata request (its ETag), not a second download.
    """

    def __init__(self) -> None:
        self._verified: dict[str, tuple[int, int]] = {}  # local path -> (size, mtime_ns) when it last matched

    def changed(self, url: str, recorded: str | None) -> str | None:
        """None when the shard still has its recorded digest (or none was recorded, or it cannot be reached:
        reading it then reports that); else the line that names it."""
        if not recorded:
            return None
        path = _local_path(url)
        try:
            if path is not None:
                if not recorded.startswith("sha256:"):
                    return None  # indexed as remote, read as local: nothing comparable
                st = os.stat(path)
                if self._verified.get(path) == (st.st_size, st.st_mtime_ns):
                    return None
                now = shard_digest(url)
                if now == recorded:
                    self._verified[path] = (st.st_size, st.st_mtime_ns)
                    return None
            else:
                now = shard_digest(url)
                if now == recorded:
                    return None
        except OSError:
            return None
        kind = recorded.partition(":")[0]
        return (f"shard {url} changed since the data stage indexed it ({kind} {_short(now)} != {_short(recorded)}): "
                "skipped")


def image_key(sample: dict[str, Any]) -> str | None:
    """Which image member the sample has (jpg, jpeg, png, webp), or None."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def caption(sample: dict[str, Any]) -> str:
    """The caption: the txt member, else the json's "caption", else ""."""
    txt = sample.get("txt")
    if txt is not None:
        if isinstance(txt, str):
            return txt
        try:
            return txt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: caption is not UTF-8 ({exc})") from exc
    meta = metadata(sample)
    cap = meta.get("caption")
    return cap if isinstance(cap, str) else ""


def metadata(sample: dict[str, Any]) -> dict[str, Any]:
    """The json member as a dict ({} when there is none)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: json member is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')}: json member is a {type(meta).__name__}, not an object")
    return meta


def _stats_url(shard_url: str) -> str:
    base = shard_url[: -len(".tar")] if shard_url.endswith(".tar") else shard_url
    return f"{base}_stats.json"


def count_samples(urls: str | Iterable[str]) -> int | None:
    """Samples in the shards by img2dataset's `*_stats.json` (sum of successes); None if one is missing."""
    total = 0
    for url in expand_urls(urls):
        try:
            with fsspec.open(_stats_url(url), "r") as f:
                stats = json.load(f)
        except FileNotFoundError:
            return None
        try:
            total += int(stats["successes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{_stats_url(url)}: no integer 'successes' ({exc}); is it an img2dataset stats file?") from exc
    return total


def _member_bytes(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json" and isinstance(value, (dict, list)):
        return json.dumps(value, indent=4, ensure_ascii=False).encode("utf-8")
    raise ValueError(f"member {ext!r}: cannot write a {type(value).__name__}; give bytes, str or (for json) a dict")


class ShardWriter:
    """Writes samples as `OUT/{shard:05d}.tar` + `OUT/{shard:05d}_stats.json`, img2dataset style.

    Keys are renumbered `{shard:05d}{index:0Nd}` (N = max(4, digits of samples_per_shard - 1)), and a
    json dict's "key" is set to the new key. Each tar is written under a `.partial` name and moved to
    its final name when complete, so a crash never leaves a half-written shard that looks finished.
    Members are written in the sample's order with a fixed mtime: the same input, byte-identical shards.
    """

    def __init__(self, output_url: str, samples_per_shard: int = 10000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.fs, root = fsspec.core.url_to_fs(output_url)
        self.root = root.rstrip("/") or root
        self.output_url = output_url.rstrip("/")
        self.samples_per_shard = samples_per_shard
        self.index_width = max(4, len(str(samples_per_shard - 1)))
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[str] = []  # final URLs of the completed shards
        self.written = 0
        self._shard = 0
        self._count = 0
        self._raw: Any = None
        self._tar: tarfile.TarFile | None = None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _open(self) -> None:
        self._raw = self.fs.open(self._path(f"{self._shard:05d}.tar.partial"), "wb")
        self._tar = tarfile.open(fileobj=self._raw, mode="w|", format=tarfile.GNU_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._raw.close()
        self._tar = self._raw = None
        name = f"{self._shard:05d}"
        self.fs.mv(self._path(f"{name}.tar.partial"), self._path(f"{name}.tar"))
        stats = {"count": self._count, "successes": self._count, "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": self._count}}
        with self.fs.open(self._path(f"{name}_stats.json"), "w") as f:
            json.dump(stats, f, indent=4)
        self.shards.append(f"{self.output_url}/{name}.tar")
        self._shard += 1

    def write(self, sample: dict[str, Any]) -> str:
        """Add one sample (members by extension; `__*__` entries ignored) -> the key it got."""
        if self._tar is None:
            self._open()
        assert self._tar is not None
        key = f"{self._shard:05d}{self._count:0{self.index_width}d}"
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            if ext == "json" and isinstance(value, dict) and "key" in value:
                value = {**value, "key": key}
            data = _member_bytes(ext, value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.written += 1
        if self._count >= self.samples_per_shard:
            self._finish()
        return key

    def close(self) -> list[str]:
        """Finish the last shard -> the URLs of all shards written."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its `.partial` file); completed shards stay."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._raw.close()
            finally:
                self._tar = self._raw = None
                partial = self._path(f"{self._shard:05d}.tar.partial")
                if self.fs.exists(partial):
                    self.fs.rm(partial)

    def pattern(self) -> str | None:
        """A brace pattern naming the shards written, e.g. `OUT/{00000..00003}.tar`."""
        if not self.shards:
            return None
        if len(self.shards) == 1:
            return self.shards[0]
        return f"{self.output_url}/{{00000..{len(self.shards) - 1:05d}}}.tar"

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
