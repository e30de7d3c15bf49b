"""Training batches from image-caption shards: split across ranks and loader workers, resumable exactly.

Every rank runs `data.loader_workers` DataLoader workers (0 = the training process reads itself);
together they are world size x max(1, workers) *readers*. Each epoch the shard order of a source
is reshuffled from (seed, source, epoch) and reader r takes every R-th shard of it, so each shard
is read by exactly one reader per epoch and a rank's I/O falls as 1/world size (the way
webdataset's split_by_node and split_by_worker split). A source with fewer shards than readers is
read by every reader, each keeping every R-th sample. Decoding, AutoAugment and tokenising run in
the workers.

Everything random is a function of the seed and a position, never of process state: the shard
order of (source, epoch), the shuffle buffer of (source, epoch, reader), the choice of source for
a reader's k-th draw, and the augmentation of that draw. A reader's position (draws so far, and
per source the epoch and the samples taken in it) is therefore all a checkpoint needs: a resumed
reader replays its current epoch without decoding up to that position and goes on with exactly the
samples, augmentations and batches an uninterrupted run would have had.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jobs.data.shards import DigestCheck, caption, image_key, iter_samples, metadata
from models.tokenizer import tokenize

if TYPE_CHECKING:
    from filipctl.schema import Recipe

CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def image_transform(image_size: int, augment: bool):
    from torchvision import transforms as T

    steps: list[Any] = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    if augment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def decode_image(sample: dict[str, Any]):
    from PIL import Image

    key = image_key(sample)
    if key is None:
        raise ValueError("no image member (jpg, jpeg, png or webp)")
    return Image.open(io.BytesIO(sample[key])).convert("RGB")


def _seed_of(*parts: object) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(63)


@dataclass(frozen=True)
class ShardSource:
    """One training source as the data stage indexed it: its shards and their sample counts (data.json)."""

    url: str
    weight: float
    shards: tuple[str, ...]
    counts: tuple[int, ...]  # samples per shard
    digests: tuple[str | None, ...] = ()  # per shard as the data stage recorded it; none: not checked

    def digest(self, i: int) -> str | None:
        return self.digests[i] if i < len(self.digests) else None


@dataclass(frozen=True)
class ReaderPlan:
    """What every reader of a run agrees on."""

    sources: tuple[ShardSource, ...]
    readers: int  # world size x readers per rank
    seed: int
    shuffle_buffer: int


@dataclass
class Position:
    """Where one reader stands: draws so far, and per source [epoch, samples taken in that epoch]."""

    draws: int = 0
    sources: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"draws": self.draws, "sources": [list(s) for s in self.sources]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Position":
        return cls(int(d["draws"]), [[int(e), int(n)] for e, n in d["sources"]])


@dataclass
class Problems:
    """What a reader could not read, for the log and the skipped-samples metric."""

    messages: list[str] = field(default_factory=list)
    skipped: int = 0  # samples lost: undecodable ones (drawn) and those a damaged shard took with it (never drawn)
    lost: int = 0  # of which never drawn
    muted: bool = False  # while a resumed reader replays what was already counted

    def add(self, message: str, samples: int, drawn: bool) -> None:
        if not self.muted:
            self.messages.append(message)
            self.skipped += samples
            self.lost += 0 if drawn else samples

    def take(self) -> tuple[list[str], int, int]:
        out = (self.messages, self.skipped, self.lost)
        self.messages, self.skipped, self.lost = [], 0, 0
        return out


def _buffered_shuffle(samples: Iterator[dict[str, Any]], rng: random.Random, size: int) -> Iterator[dict[str, Any]]:
    """webdataset's buffered shuffle, flushed at the end of the epoch so a position can be replayed."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict[str, Any]] = []
    for item in samples:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# One per reader process: a shard is hashed once, not every epoch (shards.DigestCheck).
_DIGESTS = DigestCheck()


def _shard_samples(url: str, expected: int, owner: bool, problems: Problems,
                   digest: str | None = None) -> Iterator[dict[str, Any]]:
    """One shard's samples; damage is counted against what its index says it holds (by its owner only). A shard
    changed since the data stage recorded its digest is skipped whole and counted like a damaged one."""
    changed = _DIGESTS.changed(url, digest)
    if changed:
        if owner:
            problems.add(f"{changed} ({expected} samples)", max(expected, 1), drawn=False)
        return
    errors: list[str] = []
    got = 0
    for sample in iter_samples([url], on_error=lambda u, exc: errors.append(f"{u}: {exc}")):
        got += 1
        yield sample
    if errors and owner:
        lost = max(expected - got, 0)
        problems.add(f"{errors[0]} ({lost} of {expected} samples lost)" if lost else errors[0], max(lost, 1),
                     drawn=False)


def epoch_samples(plan: ReaderPlan, src: int, epoch: int, reader: int, problems: Problems) -> Iterator[dict[str, Any]]:
    """The raw samples `reader` takes from source `src` in `epoch`, in their shuffled order."""
    source = plan.sources[src]
    order = list(range(len(source.shards)))
    random.Random(f"{plan.seed}/{src}/{epoch}").shuffle(order)

    def samples() -> Iterator[dict[str, Any]]:
        if len(order) >= plan.readers:
            for i in order[reader :: plan.readers]:
                yield from _shard_samples(source.shards[i], source.counts[i], True, problems, source.digest(i))
            return
        # Fewer shards than readers: everyone reads everything and keeps every R-th sample.
        n = 0
        for pos, i in enumerate(order):
            for sample in _shard_samples(source.shards[i], source.counts[i], pos % plan.readers == reader, problems,
                                         source.digest(i)):
                if n % plan.readers == reader:
                    yield sample
                n += 1

    return _buffered_shuffle(samples(), random.Random(f"{plan.seed}/{src}/{epoch}/{reader}"), plan.shuffle_buffer)


class ReaderStream:
    """The endless sample stream of one reader from a position; `position` follows every draw."""

    def __init__(self, plan: ReaderPlan, reader: int, position: Position | None, problems: Problems) -> None:
        self.plan, self.reader, self.problems = plan, reader, problems
        self.position = position or Position(0, [[0, 0] for _ in plan.sources])
        total = sum(s.weight for s in plan.sources)
        self._cumulative = [sum(s.weight for s in plan.sources[: i + 1]) / total for i in range(len(plan.sources))]
        self._streams: dict[int, Iterator[dict[str, Any]]] = {}

    def _open(self, src: int) -> Iterator[dict[str, Any]]:
        """The source's stream at the recorded position: its epoch replayed, undecoded, up to there."""
        epoch, taken = self.position.sources[src]
        stream = epoch_samples(self.plan, src, epoch, self.reader, self.problems)
        self.problems.muted = True
        try:
            for _ in range(taken):
                next(stream, None)
        finally:
            self.problems.muted = False
        return stream

    def _next_of(self, src: int) -> dict[str, Any]:
        if src not in self._streams:
            self._streams[src] = self._open(src)
        sample = next(self._streams[src], None)
        if sample is None:  # the epoch is over: the next one, reshuffled
            if self.position.sources[src][1] == 0:
                raise RuntimeError(f"source {self.plan.sources[src].url}: reader {self.reader} found no readable "
                                   "sample in a whole epoch")
            self.position.sources[src] = [self.position.sources[src][0] + 1, 0]
            self._streams[src] = self._open(src)
            return self._next_of(src)
        self.position.sources[src][1] += 1
        return sample

    def draw(self) -> tuple[dict[str, Any], int]:
        """-> (the next raw sample, its draw index k); the source is the seeded mix's choice for k."""
        k = self.position.draws
        src = 0
        if len(self.plan.sources) > 1:
            u = random.Random(f"{self.plan.seed}/mix/{self.reader}/{k}").random()
            src = next((i for i, c in enumerate(self._cumulative) if u < c), len(self._cumulative) - 1)
        sample = self._next_of(src)
        self.position.draws += 1
        return sample, k


@dataclass
class ReaderBatch:
    """What a reader hands the training process: a batch and where the reader stands after it."""

    images: Tensor  # [b, 3, H, W]
    ids: Tensor  # [b, L]
    reader: int
    position: dict[str, Any]
    drawn: int  # samples drawn for this batch, undecodable ones included
    skipped: int  # samples lost: undecodable, or taken away by a damaged shard
    lost: int  # of which never drawn (a damaged shard's)
    problems: list[str]  # what could not be read: "shard url: key: why"


class TrainSamples(IterableDataset):
    """The batches of one rank's readers; DataLoader worker w serves reader slot (w + rotation) % slots."""

    def __init__(self, plan: ReaderPlan, rank: int, slots: int, positions: dict[int, Position], rotation: int,
                 recipe: "Recipe") -> None:
        self.plan, self.rank, self.slots, self.positions, self.rotation = plan, rank, slots, positions, rotation
        self.batch_size = recipe.train.micro_batch_size
        self.context_length = recipe.model.text.context_length
        self.image_size = recipe.model.image.image_size
        self.augment, self.text_augment = recipe.data.augment, recipe.data.text_augment

    def reader_of(self, worker: int) -> int:
        return self.rank * self.slots + (worker + self.rotation) % self.slots

    def __iter__(self) -> Iterator[ReaderBatch]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # the training process owns the cores
        reader = self.reader_of(info.id if info is not None else 0)
        problems = Problems()
        stream = ReaderStream(self.plan, reader, self.positions.get(reader), problems)
        transform = image_transform(self.image_size, self.augment)
        images: list[Tensor] = []
        texts: list[str] = []
        drawn = 0
        while True:
            sample, k = stream.draw()
            drawn += 1
            try:
                image = self._image(sample, transform, reader, k)
                text = self._caption(sample, reader, k)
            except Exception as exc:  # an undecodable sample: skipped, counted, named
                problems.add(f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}: {exc}", 1, drawn=True)
                continue
            images.append(image)
            texts.append(text)
            if len(images) == self.batch_size:
                messages, skipped, lost = problems.take()
                yield ReaderBatch(torch.stack(images), tokenize(texts, self.context_length), reader,
                            stream.position.to_json(), drawn, skipped, lost, messages)
                images, texts, drawn = [], [], 0

    def _image(self, sample: dict[str, Any], transform, reader: int, k: int) -> Tensor:
        image = decode_image(sample)
        if not self.augment:
            return transform(image)
        # The augmentation of draw k of this reader, whatever ran before it in this process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(self.plan.seed, "augment", reader, k))
            return transform(image)

    def _caption(self, sample: dict[str, Any], reader: int, k: int) -> str:
        text = caption(sample)
        if not self.text_augment:
            return text
        alternatives = metadata(sample).get("alt_captions") or []
        choices = [text, *[c for c in alternatives if isinstance(c, str) and c.strip()]]
        return random.Random(f"{self.plan.seed}/text/{reader}/{k}").choice(choices)


def sources_of(index: dict[str, Any]) -> list[ShardSource]:
    return [ShardSource(s["url"], float(s["weight"]), tuple(s["shards"]), tuple(s["counts"]),
                        tuple(s.get("digests") or ())) for s in index["train"]]


class TrainBatches:
    """The training process's side: endless (images, ids) batches, what was skipped, and a state to resume from.

    The DataLoader hands out its workers' batches round-robin; the state records each reader's
    position and which reader comes next, so a resumed loader starts with its workers rotated.
    """

    def __init__(self, recipe: "Recipe", sources: list[ShardSource], rank: int, world_size: int,
                 state: dict[str, Any] | None = None) -> None:
        data = recipe.data
        workers = data.loader_workers
        self.slots = max(1, workers)
        self.plan = ReaderPlan(tuple(sources), world_size * self.slots, recipe.train.seed, data.shuffle_buffer)
        state = state or {}
        if state and (state.get("readers") != self.plan.readers or state.get("sources") != len(sources)):
            raise ValueError(f"the checkpoint's data position is for {state.get('readers')} readers and "
                             f"{state.get('sources')} sources; this run has {self.plan.readers} readers "
                             f"(world size x loader workers) and {len(sources)} sources")
        self.positions = {int(r): Position.from_json(p) for r, p in state.get("positions", {}).items()}
        self.rotation = int(state.get("next", 0))
        self.served = 0
        # Samples read (drawn, or lost in a damaged shard before they could be) and of those not usable.
        self.read, self.skipped = int(state.get("read", 0)), int(state.get("skipped", 0))
        self._problems: list[str] = []
        dataset = TrainSamples(self.plan, rank, self.slots, dict(self.positions), self.rotation, recipe)
        self._batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                        persistent_workers=workers > 0))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch: ReaderBatch = next(self._batches)
        self.positions[batch.reader] = Position.from_json(batch.position)
        self.served += 1
        self.read += batch.drawn + batch.lost
        self.skipped += batch.skipped
        self._problems += batch.problems
        return batch.images, batch.ids

    def take_problems(self) -> list[str]:
        """What could not be read since the last call, for the log."""
        out, self._problems = self._problems, []
        return out

    def state(self) -> dict[str, Any]:
        return {"readers": self.plan.readers, "sources": len(self.plan.sources),
                "positions": {str(r): p.to_json() for r, p in sorted(self.positions.items())},
                "next": (self.rotation + self.served) % self.slots, "read": self.read, "skipped": self.skipped}
