"""The tracking store: which one a command uses, whether it answers, and a client to read it.

MLflow's own client retries an unanswering server for minutes and writes tables into any sqlite
file; `check_store` answers in about the configured timeout with one line instead. mlflow is
imported inside the functions so that importing filipctl stays fast.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filipctl.errors import FilipctlError
from filipctl.schema import TRACKING_SCHEMES


def resolve_uri(uri: str | None) -> str:
    """The recipe's tracking URI, or a sqlite store in the working directory."""
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str, experiment_id: str = "") -> str:
    """How to look at the runs. MLflow 3.17's UI opens every experiment as the GenAI overview unless the browser's
    "Model training" switch is on: it ignores the experiment's mlflow.experimentKind tag (filipctl sets it anyway, for
    the UIs that read it); a link with workflowType=machine_learning opens the training runs table."""
    page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000{page}"


def check_store(uri: str, timeout_s: float, must_exist: bool) -> None:
    """Fail in about `timeout_s` with one line when the tracking store cannot be used; write nothing.

    MLflow's own client retries an unanswering server with back-off for minutes, writes its tables
    into any sqlite file it is pointed at, and answers other mistakes with tracebacks. A server
    must answer MLflow's REST API (401/403 pass: MLflow brings the credentials); a sqlite store must
    be an MLflow database (`must_exist`: read commands) or a new file in a writable folder.
    """
    if not uri.startswith(TRACKING_SCHEMES):
        raise FilipctlError(f"tracking URI {uri!r}: not a store MLflow can use here; give sqlite:///PATH/mlflow.db, "
                            "http(s)://HOST:PORT of an MLflow server, or a database URL (postgresql://...)")
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri, must_exist)
    else:
        _check_driver(uri)


# A database store needs its SQLAlchemy driver; MLflow would fail with a traceback deep inside.
DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("MySQLdb", "pymysql"), "mssql": ("pyodbc",)}


def _check_driver(uri: str) -> None:
    import importlib.util

    scheme = uri.split("://", 1)[0].split("+", 1)[0]
    modules = DRIVERS.get(scheme)
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise FilipctlError(f"tracking store {uri.split('@')[-1]}: no {scheme} driver is installed "
                            f"(pip install {modules[0].lower()}), or use sqlite:///PATH/mlflow.db")


def _check_server(uri: str, timeout_s: float) -> None:
    import http.client
    import urllib.error
    import urllib.request

    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        urllib.request.urlopen(urllib.request.Request(probe, method="GET"), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a server that wants credentials: MLflow sends them (MLFLOW_TRACKING_TOKEN, ...)
        raise FilipctlError(f"{uri} answered HTTP {exc.code} to MLflow's API ({probe}): is it an MLflow tracking "
                            "server? check the address and port") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise FilipctlError(f"MLflow tracking server {uri} does not answer within {timeout_s:g} s ({why}); "
                            "check that it is running and reachable, or set tracking.uri / --tracking-uri "
                            "to another store") from None
    except (ValueError, http.client.HTTPException) as exc:
        raise FilipctlError(f"tracking URI {uri!r} is not a valid URL ({exc})") from None


def _check_sqlite(uri: str, must_exist: bool) -> None:
    import os
    import sqlite3

    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if path.is_dir():
        raise FilipctlError(f"tracking store {uri}: {path} is a folder; name a database file, e.g. {path}/mlflow.db")
    if not path.exists():
        if must_exist:
            raise FilipctlError(f"no MLflow store at {uri}: run `filipctl run RECIPE` here first, or pass "
                                "--tracking-uri")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise FilipctlError(f"tracking store {uri}: cannot create {path.name} in {path.parent} (no such "
                                "writable folder)")
        return
    with open(path, "rb") as f:
        header = f.read(16)
    if header and header != b"SQLite format 3\x00":
        raise FilipctlError(f"tracking store {uri}: {path} is not an SQLite database")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise FilipctlError(f"tracking store {uri}: cannot read {path}: {exc}") from None
    if (tables or must_exist) and "experiments" not in tables:
        raise FilipctlError(f"tracking store {uri}: {path} is an SQLite database but not an MLflow store "
                            "(no experiments table); point tracking.uri / --tracking-uri at another file")


def open_store(uri: str):
    """An MlflowClient for reading, MLflow's initial-table chatter silenced."""
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store: noise in the run's output.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # MLflow's client retries an unanswering server for about 4 minutes per call; filipctl's forwarder retries
    # with its own back-off instead, so a call gives up soon (a user's own setting wins).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    with _setup_lock(Path(uri.removeprefix("sqlite:///").split("?", 1)[0])):
        return MlflowClient(uri)  # sets the store up (tables, migrations) as it is made


@contextmanager
def _setup_lock(db: Path) -> Iterator[None]:
    """One process at a time sets up a sqlite store: MLflow creates and migrates its tables on first use, and two
    processes doing that at once fail ("Online migration expected to match one row ... alembic_version", "table
    ... already exists"). An fcntl lock on a file beside the database; none where that folder is read-only (a
    store there is not being created)."""
    import fcntl

    try:
        fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: as before
            pass
        yield
    finally:
        os.close(fd)
