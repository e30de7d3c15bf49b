"""Each rank's last completed step and when, so that a rank whose collective failed can say which rank stopped.

A collective that times out only tells the ranks that waited that someone did not come. Every rank
therefore rewrites one small file of its own, `<stage folder>/logs/heartbeat/rank<R>`, after every
step (one 64-byte pwrite into an open file: microseconds, against a step of tenths of a second); the
rank whose collective failed reads them all and names the rank that fell behind, and since when.
The folder is the stage folder every backend shares with its ranks (local disk, a cluster's shared
file system); where it cannot be written the heartbeat stays silent and the diagnosis says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

RECORD_BYTES = 64  # fixed size: every write replaces the whole record in place, so no reader sees a shorter tail


@dataclass(frozen=True)
class Beat:
    rank: int
    step: int  # the last step the rank completed (the step it resumed from before its first one)
    time: float  # wall clock (time.time()) of that moment
    waiting: bool = False  # the rank's own collective failed: it was waiting for another, not stopped


def beat_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}"


class Heartbeat:
    """This rank's heartbeat file, kept open; `beat(step)` after every step."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder, self.rank = folder, rank
        self.started = time.time()  # about when the whole group joined: older beats are an earlier attempt's
        self.step = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(beat_file(folder, rank), os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            self._fd = None  # not writable from here (e.g. a Ray worker on another node): no diagnosis, no failure

    def beat(self, step: int, waiting: bool = False) -> None:
        self.step = step
        if self._fd is None:
            return
        record = f"{step} {time.time():.3f} {'W' if waiting else '-'}".encode().ljust(RECORD_BYTES - 1) + b"\n"
        try:
            os.pwrite(self._fd, record, 0)
        except OSError:
            pass  # a full disk must not fail a step for the sake of a diagnosis

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_beats(folder: Path) -> dict[int, Beat]:
    """Every rank's last beat found in `folder` (unreadable or torn records are left out)."""
    beats: dict[int, Beat] = {}
    for path in folder.glob("rank*"):
        try:
            rank = int(path.name.removeprefix("rank"))
            step, t, flag = path.read_bytes().split()[:3]
            beats[rank] = Beat(rank, int(step), float(t), flag == b"W")
        except (OSError, ValueError):
            continue
    return beats


def who_stopped(heartbeat: Heartbeat, world_size: int, wait_s: float = 3.0) -> str:
    """Which ranks stopped, as this rank's collective failed: "rank 1 (stopped after step 12, no progress for 31 s)".

    Every rank whose own collective failed marks its heartbeat as waiting; after `wait_s`, for the others to
    mark theirs (they time out together), a rank not marked is one that stopped: a hung, stopped or dead
    process. Without that mark, ranks that stopped in the middle of the same step could not be told apart.
    """
    heartbeat.beat(max(heartbeat.step, 0), waiting=True)
    time.sleep(wait_s)
    now = time.time()
    beats = read_beats(heartbeat.folder)
    slack = 5.0  # the ranks of one group start within seconds of each other
    silent = [r for r in range(world_size) if r != heartbeat.rank
              and (r not in beats or beats[r].time < heartbeat.started - slack)]
    stopped = sorted((b for r, b in beats.items() if r != heartbeat.rank and r < world_size and r not in silent
                      and not b.waiting), key=lambda b: (b.step, b.time))
    said = [f"rank {b.rank} (stopped after step {b.step}, no progress for {now - b.time:.0f} s)" for b in stopped]
    said += [f"rank {r} (never reached its first step)" for r in silent]
    if said:
        return ", ".join(said)
    if heartbeat.rank not in beats:
        return f"another rank (which one is unknown: no heartbeat files in {heartbeat.folder})"
    return ("another rank (which one is unknown: every rank was waiting in a collective, so they may have called "
            "different ones, a code path that differs between ranks)")
