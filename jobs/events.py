"""Progress events from jobs to whoever launched them.

A job calls `emit(...)`: the message goes to stdout (so job logs read well on their own) and,
when the launcher named an events file (contract.ENV_EVENTS), one JSON line is appended there;
the CLI tails that file to draw progress bars whatever backend runs the job.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from filipctl.contract import ENV_EVENTS


def emit(message: str, **fields: Any) -> None:
    print(message, flush=True)
    path = os.environ.get(ENV_EVENTS)
    if not path:
        return
    record = {"t": time.time(), "message": message, **fields}
    # One write() of one line: appends from several processes do not interleave.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
