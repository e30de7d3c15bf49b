"""The progress view of a graph run: a bar per stage on a terminal, plain lines elsewhere (logs, CI).

It subscribes to the runner's transitions and, once per poll interval, reads the progress events
each running job appends to its events file (jobs/events.py). It draws; it decides nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from filipctl.orchestration.runner import Transition
from filipctl.states import State


class EventTail:
    """Reads the JSON lines a job appends to its events file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        # Keep a half-written last line for the next read.
        complete, _, _rest = chunk.rpartition("\n")
        if not complete:
            return []
        self.offset += len(complete) + 1
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class ProgressView:
    def __init__(self, console: Console) -> None:
        self.console = console
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        self.progress = Progress(*columns, console=console, transient=False, disable=not console.is_terminal)
        self.tasks: dict[str, Any] = {}  # node key -> rich task
        self.tails: dict[str, tuple[str, EventTail]] = {}  # node key -> (stage name, its events)

    def __enter__(self) -> "ProgressView":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tick()
        self.progress.__exit__(None, None, None)

    def changed(self, t: Transition) -> None:
        node = t.node
        if t.new is State.CACHED:
            record = node.done() or {}
            self.console.print(f"  [{node.stage.name}] cached: {node.name} (done {record.get('finished', '?')})",
                               highlight=False, markup=False)
            return
        if t.new is State.QUEUED:
            self.tasks[node.key] = self.progress.add_task(node.stage.name, total=None, note="queued")
            self.tails[node.key] = (node.stage.name, EventTail(node.run_dir.events(node.stage.name)))
            return
        if node.key not in self.tasks:
            return  # skipped before it was submitted
        if t.new is State.RUNNING:
            self.progress.update(self.tasks[node.key], note="running")
        elif t.new.ended:
            self._read(node.key)
            self.progress.update(self.tasks[node.key], note=_WORDS.get(t.new, t.new.value.lower()))
            del self.tails[node.key]

    def tick(self) -> None:
        for key in list(self.tails):
            self._read(key)

    def _read(self, key: str) -> None:
        stage, tail = self.tails[key]
        task = self.tasks[key]
        for ev in tail.read():
            if not self.console.is_terminal:
                self.console.print(f"  [{stage}] {ev['message']}", highlight=False, markup=False, soft_wrap=True)
            current = self.progress.tasks[task]
            self.progress.update(task, total=ev.get("total", current.total), completed=ev.get("done", current.completed),
                                 note=ev["message"][-60:])


_WORDS = {State.SKIPPED: "not run"}
