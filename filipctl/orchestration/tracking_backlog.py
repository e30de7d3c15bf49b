"""The tracking records of a store that wait to be sent (a server that was down, a database that was locked), and
sending them: every command's outbox beside the state index and every stage folder's spool the index knows.

`filipctl status` shows each stage's backlog and sends what it can in a few seconds; `filipctl sync` sends it all.
MLflow is imported only when something waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filipctl.contract import RunDir
from filipctl.tracking.forwarder import outboxes, stage_spools
from filipctl.tracking.spool import Spool


@dataclass
class Backlog:
    spools: list[Spool]

    @property
    def pending(self) -> int:
        return sum(s.pending() for s in self.spools)

    def send(self, uri: str, timeout_s: float) -> int:
        """Send for at most `timeout_s` -> records still waiting. Sent outboxes are removed."""
        if not self.pending:
            return 0
        from filipctl.tracking import open_store
        from filipctl.tracking.forwarder import drain, remove_sent
        from filipctl.tracking.writer import outbox_folder

        left = drain(self.spools, open_store(uri), timeout_s)
        remove_sent([s for s in self.spools if s.path.parent == outbox_folder(uri)])
        return left


def backlog(uri: str, folders: list[str]) -> Backlog:
    """Every outbox of `uri` and the spools of `folders` (stage folders), those with records waiting."""
    from filipctl.tracking.writer import outbox_folder

    found = outboxes(outbox_folder(uri))
    for folder in dict.fromkeys(folders):
        found += stage_spools(RunDir(Path(folder)), uri) if folder else []
    return Backlog([s for s in found if s.pending()])


def behind(folder: str, uri: str) -> int:
    """Records of a stage folder's spools not yet in the store `uri`."""
    return sum(s.pending() for s in stage_spools(RunDir(Path(folder)), uri)) if folder else 0
