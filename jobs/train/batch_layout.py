"""How the recipe's global batch is split over the workers a run gets: pure arithmetic, no torch (the CLI refuses a
world size before anything starts; the job decides again on the size it actually got).

The global batch G is the invariant of a pretraining stage; `train.micro_batch_size` (mb) is the most pairs one
worker runs through the towers at once. G / mb = N *slots*: the micro-batches of one optimizer step, each drawn by
its own readers (jobs/data/loader.py), whatever the world size W. A world size is usable when it divides N or N
divides it:

    W <= N: each rank runs A = N / W micro-batches (slots r*A .. r*A + A-1) and accumulates their gradients;
    W >  N: each slot is shared by s = W / N ranks, each taking 1/s of it (micro-batch mb / s, no accumulation).

Either way rank r holds the global batch's rows [r * G/W, (r+1) * G/W) in slot order, so the gathered batch, its
order and the contrastive loss are the same at every size; only the order of floating-point sums changes.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """No integer split of the global batch over this many workers."""


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int  # G, pairs per optimizer step over every worker
    micro_batch_size: int  # the recipe's largest micro-batch per worker
    world: int  # W, worker processes

    @property
    def slots(self) -> int:
        """N: micro-batches of mb pairs in a global batch, each a fixed stream of samples."""
        return self.global_batch // self.micro_batch_size

    @property
    def accumulation(self) -> int:
        """A: micro-batches each rank runs per optimizer step."""
        return max(1, self.slots // self.world)

    @property
    def share(self) -> int:
        """s: ranks sharing one slot (1 unless the world is larger than N)."""
        return max(1, self.world // self.slots)

    @property
    def micro(self) -> int:
        """Pairs per rank per micro-step."""
        return self.micro_batch_size // self.share

    @property
    def per_rank(self) -> int:
        """Pairs per rank per optimizer step."""
        return self.global_batch // self.world

    def slot_of(self, rank: int, micro_step: int) -> tuple[int, int]:
        """-> (slot, part): rank `rank`'s micro-step `micro_step` takes part `part` (of `share`) of slot `slot`."""
        if self.share > 1:
            return rank // self.share, rank % self.share
        return rank * self.accumulation + micro_step, 0

    def describe(self) -> str:
        if self.accumulation > 1:
            return f"{self.world} x {self.accumulation} accumulated micro-batches of {self.micro}"
        return f"{self.world} x {self.micro}"


def splits(global_batch: int, micro_batch_size: int, world: int) -> bool:
    """Whether `world` workers split the global batch evenly (its micro-batches a multiple of them, or each shared
    by a whole number of them)."""
    if global_batch <= 0 or micro_batch_size <= 0 or world <= 0 or global_batch % micro_batch_size:
        return False
    slots = global_batch // micro_batch_size
    if world <= slots:
        return slots % world == 0
    return world % slots == 0 and micro_batch_size % (world // slots) == 0


def usable_worlds(global_batch: int, micro_batch_size: int, up_to: int) -> list[int]:
    """The world sizes <= up_to over which the global batch splits evenly."""
    return [w for w in range(1, up_to + 1) if splits(global_batch, micro_batch_size, w)]


def layout_for(global_batch: int, micro_batch_size: int, world: int) -> BatchLayout:
    """The split of the global batch over `world` workers; LayoutError (one line, with the usable sizes) when none
    is even."""
    if global_batch <= 0 or micro_batch_size <= 0 or global_batch % micro_batch_size:
        raise LayoutError(f"train.global_batch {global_batch} is not a multiple of train.micro_batch_size "
                          f"{micro_batch_size}")
    if splits(global_batch, micro_batch_size, world):
        return BatchLayout(global_batch, micro_batch_size, world)
    slots = global_batch // micro_batch_size
    sizes = usable_worlds(global_batch, micro_batch_size, max(2 * slots, world))
    raise LayoutError(
        f"global batch {global_batch} (train.global_batch) does not split evenly over {world} workers in "
        f"micro-batches of at most {micro_batch_size} (train.micro_batch_size): run on "
        f"{', '.join(map(str, sizes))} workers, or change the micro-batch size (a new stage)")
