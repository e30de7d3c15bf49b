"""Training batches from image-caption shards: canonical readers, resumable exactly at any world size.

The global batch is N *slots* of train.micro_batch_size (mb) samples (jobs/train/batch_layout.py), and every slot has
L = max(1, data.loader_workers) *lanes*: K = N x L canonical *readers*, reader = slot x L + lane, whatever the world
size (like MosaicML streaming's canonical nodes). Optimizer step t takes from slot c the next mb samples of reader
c x L + t % L, so each reader hands out one batch every L steps. Each epoch the shard order of a source is
reshuffled from (seed, source, epoch) and reader r takes every K-th shard of it, so each shard is read by exactly
one reader per epoch and a rank reads the shards of its slots' readers alone: 1/W of the data up to W = N ranks (the
way webdataset's split_by_node and split_by_worker split). A source with fewer shards than readers is read by every
reader, each keeping every K-th sample.

A rank's micro-batches (its slots in order, batch_layout.slot_of) go round-robin to its `data.loader_workers`
DataLoader workers (0 = the training process reads itself), which puts each reader in one worker process; decoding,
AutoAugment and tokenising run there. Ranks sharing a slot (world size > N) each read the slot's readers whole and
decode every sample (whether it decodes decides which samples make the batch), but augment and return only their
part of each batch.

Everything random is a function of the seed and a position, never of process state: the shard order of (source,
epoch), the shuffle buffer of (source, epoch, reader), the choice of source for a reader's k-th draw, and the
augmentation and caption of that draw. A reader's position (draws so far, and per source the epoch and the samples
taken in it) is therefore all a checkpoint needs: a resumed reader replays its current epoch without decoding up to
that position and goes on with exactly the samples, augmentations and batches an uninterrupted run would have had.
Neither the readers nor the lane of a step depend on the world size, so the positions of every rank's state, merged,
resume the run at any size the global batch splits over: every sample is still drawn once per epoch, and each
step's global batch is bitwise the one an uninterrupted run would have had.
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
from jobs.train.batch_layout import BatchLayout
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
    readers: int  # K: slots x lanes, whatever the world size
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
    counting: bool = True  # False: another rank reading the same reader counts (a shared slot's part 0)

    def add(self, message: str, samples: int, drawn: bool) -> None:
        if self.counting and not self.muted:
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


@dataclass(frozen=True)
class ReaderSchedule:
    """Which canonical reader makes each micro-batch of one rank, from the step it starts at: pure arithmetic."""

    layout: BatchLayout
    lanes: int  # L = max(1, data.loader_workers)
    rank: int
    start_step: int

    @property
    def readers(self) -> int:
        return self.layout.slots * self.lanes

    @property
    def part(self) -> int:
        """Which part of its slots' batches this rank takes (0 unless ranks share a slot)."""
        return self.layout.slot_of(self.rank, 0)[1]

    def reader_of(self, slot: int, step: int) -> int:
        return slot * self.lanes + step % self.lanes

    def batch(self, i: int) -> tuple[int, int]:
        """-> (step, reader) of this rank's i-th micro-batch since start_step."""
        slot, _ = self.layout.slot_of(self.rank, i % self.layout.accumulation)
        step = self.start_step + i // self.layout.accumulation
        return step, self.reader_of(slot, step)

    def own_readers(self) -> list[int]:
        """The readers of this rank's slots, every lane."""
        slots = sorted({self.layout.slot_of(self.rank, a)[0] for a in range(self.layout.accumulation)})
        return [slot * self.lanes + lane for slot in slots for lane in range(self.lanes)]


def sample_id(sample: dict[str, Any]) -> str:
    """What names a sample uniquely: its shard and key."""
    return f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"


@dataclass
class ReaderBatch:
    """What a reader hands the training process: a batch and where the reader stands after it."""

    images: Tensor  # [micro, 3, H, W]
    ids: Tensor  # [micro, L]
    reader: int
    position: dict[str, Any]
    drawn: int  # samples drawn for this batch, undecodable ones included (0 where another rank counts them)
    skipped: int  # samples lost: undecodable, or taken away by a damaged shard
    lost: int  # of which never drawn (a damaged shard's)
    problems: list[str]  # what could not be read: "shard url: key: why"
    keys: list[str]  # sample_id of each sample of the batch


class TrainSamples(IterableDataset):
    """One rank's micro-batches in order; DataLoader worker w of n makes those whose index i has i % n == w (the
    DataLoader takes its workers' batches round-robin). A reader's batches are those of one micro-step a at the steps
    t with t % n = its lane (lanes = n), so i = (t - start) A + a is the same modulo n for all of them: each reader
    lives in one worker process."""

    def __init__(self, plan: ReaderPlan, schedule: ReaderSchedule, positions: dict[int, Position],
                 recipe: "Recipe") -> None:
        self.plan, self.schedule, self.positions = plan, schedule, positions
        self.batch_size, self.micro = schedule.layout.micro_batch_size, schedule.layout.micro
        self.context_length = recipe.model.text.context_length
        self.image_size = recipe.model.image.image_size
        self.augment, self.text_augment = recipe.data.augment, recipe.data.text_augment

    def __iter__(self) -> Iterator[ReaderBatch]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # the training process owns the cores
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        transform = image_transform(self.image_size, self.augment)
        streams: dict[int, ReaderStream] = {}
        i = worker
        while True:
            _, reader = self.schedule.batch(i)
            if reader not in streams:
                streams[reader] = self._stream(reader)
            yield self._batch(streams[reader], transform)
            i += workers

    def _stream(self, reader: int) -> ReaderStream:
        start = self.positions.get(reader)
        # Ranks sharing a slot read the same streams: its part 0 alone counts what was lost.
        return ReaderStream(self.plan, reader, Position.from_json(start.to_json()) if start else None,
                            Problems(counting=self.schedule.part == 0))

    def _batch(self, stream: ReaderStream, transform) -> ReaderBatch:
        """The reader's next batch: the next mb samples that decode, of which this rank augments and returns its
        part. Every sharing rank decodes them all: which samples decode decides the batch and where the next begins."""
        part = self.schedule.part
        lo, hi = part * self.micro, (part + 1) * self.micro
        images: list[Tensor] = []
        texts: list[str] = []
        keys: list[str] = []
        usable = drawn = 0
        while usable < self.batch_size:
            sample, k = stream.draw()
            drawn += 1
            try:
                image = decode_image(sample)
                text = self._caption(sample, stream.reader, k)
            except Exception as exc:  # an undecodable sample: skipped, counted, named
                stream.problems.add(f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}: {exc}", 1,
                                    drawn=True)
                continue
            if lo <= usable < hi:
                images.append(self._image(image, transform, stream.reader, k))
                texts.append(text)
                keys.append(sample_id(sample))
            usable += 1
        messages, skipped, lost = stream.problems.take()
        return ReaderBatch(torch.stack(images), tokenize(texts, self.context_length), stream.reader,
                           stream.position.to_json(), drawn if part == 0 else 0, skipped, lost, messages, keys)

    def _image(self, image, transform, reader: int, k: int) -> Tensor:
        if not self.augment:
            return transform(image)
        # The augmentation of draw k of this reader, whatever ran before it in this process.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed also queues lazy seeds for CUDA/XPU/MTIA, each formatting the
            # Python stack, ~0.4 ms a sample on a CUDA build (benchmarks/peers.py --profile); the draws are the same.
            torch.default_generator.manual_seed(_seed_of(self.plan.seed, "augment", reader, k))
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


@dataclass
class Resumed:
    """Every old rank's data state as one: each reader's position, and the counters summed."""

    positions: dict[int, Position] = field(default_factory=dict)
    read: int = 0
    skipped: int = 0


def _describe(shape: dict[str, Any]) -> str:
    if "lanes" not in shape:
        return f"{shape.get('readers')} readers and {shape.get('sources')} sources"
    return (f"{shape.get('readers')} readers ({shape.get('slots')} slots = train.global_batch / "
            f"train.micro_batch_size, x {shape.get('lanes')} lanes = data.loader_workers) and "
            f"{shape.get('sources')} sources")


def merge_states(states: list[dict[str, Any]], shape: dict[str, int], start_step: int) -> Resumed:
    """The data states of every rank of a checkpoint, whatever its world size, merged; ValueError (one line) when
    they are not of this run's readers or not of one checkpoint.

    A state written before slots and lanes were recorded is taken when its reader and source counts match: a
    reader's position means the same in every run with the same readers."""
    out = Resumed()
    for state in states:
        keys = ("readers", "slots", "lanes", "sources") if "lanes" in state else ("readers", "sources")
        if any(state.get(k) != shape[k] for k in keys):
            raise ValueError(f"the checkpoint's data position is for {_describe(state)}; this run has "
                             f"{_describe(shape)}: continue with the global batch, micro-batch size and loader "
                             "workers it was written with")
        if "step" in state and state["step"] != start_step:
            raise ValueError(f"a data position of step {state['step']} does not resume step {start_step}: the "
                             "data_rank files are not of that checkpoint")
        for reader, position in state.get("positions", {}).items():
            reader, position = int(reader), Position.from_json(position)
            if not 0 <= reader < shape["readers"]:
                raise ValueError(f"the checkpoint has a data position for reader {reader}; this run has readers "
                                 f"0..{shape['readers'] - 1}")
            # Ranks sharing a slot each hold its readers' positions, equal if they are of one checkpoint.
            if out.positions.setdefault(reader, position) != position:
                raise ValueError(f"two ranks' data positions of reader {reader} differ: the data_rank files are not "
                                 "of one checkpoint")
        out.read += int(state.get("read", 0))
        out.skipped += int(state.get("skipped", 0))
    missing = sorted(set(range(shape["readers"])) - set(out.positions))
    if states and missing and all("lanes" in s for s in states):
        raise ValueError(f"the data positions of {len(missing)} of {shape['readers']} readers (first: reader "
                         f"{missing[0]}) are missing from the {len(states)} data state(s) given: every rank's "
                         "data_rank file of the checkpoint is needed")
    return out


class TrainBatches:
    """The training process's side: endless (images, ids) micro-batches, what was skipped, and a state to resume from.

    Batch i (from 0) since `start_step` is micro-step i % A of step start_step + i // A (A = layout.accumulation):
    this rank's part of its slot's batch from the lane of that step. The state holds the positions of this rank's
    readers; resuming takes the states of every rank of the checkpoint, whatever the world size that wrote them.
    """

    def __init__(self, recipe: "Recipe", sources: list[ShardSource], rank: int, layout: BatchLayout,
                 states: list[dict[str, Any]] | None = None, start_step: int = 0) -> None:
        data = recipe.data
        if layout.micro_batch_size != recipe.train.micro_batch_size:
            raise ValueError(f"the batch layout is for micro-batches of {layout.micro_batch_size}; the recipe's "
                             f"train.micro_batch_size is {recipe.train.micro_batch_size}")
        lanes = max(1, data.loader_workers)
        self.schedule = ReaderSchedule(layout, lanes, rank, start_step)
        self.plan = ReaderPlan(tuple(sources), self.schedule.readers, recipe.train.seed, data.shuffle_buffer)
        self.shape = {"readers": self.plan.readers, "slots": layout.slots, "lanes": lanes, "sources": len(sources)}
        resumed = merge_states(states or [], self.shape, start_step)
        self.positions = {r: resumed.positions.get(r) or Position(0, [[0, 0] for _ in sources])
                          for r in self.schedule.own_readers()}
        # Samples read (drawn, or lost in a damaged shard before they could be) and of those not usable; every old
        # rank's on rank 0 only, so that their sum over the ranks stays right at any world size.
        self.read, self.skipped = (resumed.read, resumed.skipped) if rank == 0 else (0, 0)
        self.served = 0
        self.last_keys: list[str] = []  # sample_id of each sample of the last batch returned
        self._problems: list[str] = []
        dataset = TrainSamples(self.plan, self.schedule, dict(self.positions), recipe)
        workers = data.loader_workers
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
        self.last_keys = batch.keys
        return batch.images, batch.ids

    def take_problems(self) -> list[str]:
        """What could not be read since the last call, for the log."""
        out, self._problems = self._problems, []
        return out

    def state(self) -> dict[str, Any]:
        """Where this rank's readers stand, after the last whole step served (call it between steps)."""
        return {**self.shape, "step": self.schedule.start_step + self.served // self.schedule.layout.accumulation,
                "positions": {str(r): p.to_json() for r, p in sorted(self.positions.items())},
                "read": self.read, "skipped": self.skipped}
