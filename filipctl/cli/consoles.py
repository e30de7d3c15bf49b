"""The two consoles every command prints to: `out` (stdout) and `err` (stderr, and where progress goes under --json).

Commands read them as `consoles.out` / `consoles.err`, never `from ... import out`: `main()` makes them again
(`renew`) once it has cleaned COLUMNS, and a name imported before that would keep the old ones.
"""

from __future__ import annotations

from rich.console import Console

out = Console()
err = Console(stderr=True)


def renew() -> None:
    """Make both consoles again: a Console reads COLUMNS when it is made."""
    global out, err
    out, err = Console(), Console(stderr=True)
