"""Tracking: the one MLflow writer (writer.py), the store check (store.py), what may be logged (redact.py),
what made a run (provenance.py) and finding runs again (runs.py). Nothing here imports mlflow at module level."""

from filipctl.tracking.redact import REDACTED, flatten, redact
from filipctl.tracking.store import check_store, open_store, resolve_uri, ui_command
from filipctl.tracking.writer import Tracker

__all__ = ["REDACTED", "Tracker", "check_store", "flatten", "open_store", "redact", "resolve_uri",
           "ui_command"]
