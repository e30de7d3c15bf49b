"""The CLI's front door: every usage error prints the usage line and one message, exit 2, no traceback;
a tracking server that does not answer fails within its time bound, before anything is written."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

SMOKE = str(ROOT / "recipes/smoke.yaml")

# (argv, what the message must say). Per command: an unknown option, a bad value, a missing argument or value.
USAGE_ERRORS = {
    "unknown command": (["runn"], "No such command 'runn'"),
    "unknown subcommand": (["recipe", "valdate", SMOKE], "No such command 'valdate'"),
    "run: unknown option": (["run", "--bogus", SMOKE], "No such option: --bogus"),
    "run: missing argument": (["run"], "Missing argument 'RECIPE'"),
    "run: missing value": (["run", SMOKE, "--set"], "'--set' requires an argument"),
    "run: flag with a value": (["run", SMOKE, "--dry-run=yes"], "--dry-run"),
    "status: unknown option": (["status", "--bogus"], "No such option: --bogus"),
    "status: bad value": (["status", "--limit", "abc"], "Invalid value for '--limit'"),
    "status: out of range": (["status", "--limit", "0"], "--limit"),
    "status: missing value": (["status", "--limit"], "'--limit' requires an argument"),
    "status: bad timeout": (["status", "--tracking-timeout", "soon"], "Invalid value for '--tracking-timeout'"),
    "logs: unknown option": (["logs", "--bogus"], "No such option: --bogus"),
    "logs: bad value": (["logs", "--tail", "many"], "Invalid value for '--tail'"),
    "logs: extra argument": (["logs", "a", "b"], "unexpected extra argument"),
    "cancel: unknown option": (["cancel", "--bogus"], "No such option: --bogus"),
    "cancel: missing value": (["cancel", "--experiment"], "'--experiment' requires an argument"),
    "recipe validate: missing argument": (["recipe", "validate"], "Missing argument 'RECIPE'"),
    "recipe validate: unknown option": (["recipe", "validate", SMOKE, "--bogus"], "No such option: --bogus"),
    "recipe show: missing argument": (["recipe", "show"], "Missing argument 'RECIPE'"),
    "recipe show: missing value": (["recipe", "show", SMOKE, "-s"], "'-s' requires an argument"),
    "recipe keys: unknown option": (["recipe", "keys", "--bogus"], "No such option: --bogus"),
    "recipe keys: extra argument": (["recipe", "keys", "model"], "unexpected extra argument"),
}


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_error_prints_usage_and_one_message(name: str, tmp_path: Path) -> None:
    argv, message = USAGE_ERRORS[name]
    res = run_cli(*argv, cwd=tmp_path, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    assert "Usage:" in res.stderr and message.lower() in res.stderr.lower(), res.stderr
    assert res.stderr.count("Error") == 1, res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def _silent_server() -> socket.socket:
    """A TCP port that accepts connections (the kernel's backlog) but never answers a request."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


@pytest.mark.parametrize("kind", ["refused", "silent"])
@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
def test_unreachable_tracking_server_fails_within_its_bound(command: str, kind: str, tmp_path: Path) -> None:
    silent = _silent_server() if kind == "silent" else None
    port = silent.getsockname()[1] if silent else 9  # nothing listens on port 9 (discard) here
    uri = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        res = run_cli(command, "--tracking-uri", uri, "--tracking-timeout", "2", cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if silent:
            silent.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"MLflow tracking server {uri} does not answer within 2 s" in res.stderr, res.stderr
    assert res.stderr.count("error:") == 1
    # The bound (2 s) plus the interpreter's start; MLflow's own retries would take minutes.
    assert elapsed < 15, elapsed


def test_run_checks_the_tracking_server_before_submitting_anything(tmp_path: Path) -> None:
    silent = _silent_server()
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        res = run_cli("run", SMOKE, "--set", f"tracking.uri={uri}", "--set", "tracking.timeout_s=1.5",
                      "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"data.train={tmp_path / 'data'}",
                      cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert res.returncode == 1 and "does not answer within 1.5 s" in res.stderr and uri in res.stderr, res.stderr
    assert elapsed < 15, elapsed
    assert list(tmp_path.iterdir()) == []  # no run folder, no dataset, no local store


def test_recipe_that_is_not_utf8_gets_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    res = run_cli("recipe", "validate", str(recipe), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("error:") == 1 and "not a UTF-8 text file" in res.stderr and str(recipe) in res.stderr
