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
    "data filter: missing argument": (["data", "filter", "in/"], "Missing argument 'OUTPUT'"),
    "data backtranslate: missing option": (["data", "backtranslate", "in/", "out/"], "Missing option '--pivot'"),
    "data: unknown subcommand": (["data", "filtr"], "No such command 'filtr'"),
    "eval: missing argument": (["eval"], "Missing argument 'RUN_OR_CHECKPOINT'"),
    "eval: missing value": (["eval", "run1", "--dataset"], "'--dataset' requires an argument"),
    "eval: unknown option": (["eval", "run1", "--bogus"], "No such option: --bogus"),
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


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _mkdir(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _deep_extends(tmp: Path, depth: int) -> str:
    for i in range(depth):
        _write(tmp / "chain" / f"r{i}.yaml", f"extends: r{i + 1}.yaml\nname: r{i}\n")
    _write(tmp / "chain" / f"r{depth}.yaml", "name: last\n")
    return str(tmp / "chain" / "r0.yaml")


class _NotMlflow:
    """A web server that is not MLflow: 404 for everything."""

    def __enter__(self) -> str:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


# name -> (argv builder(tmp) , exit status, fragment of the one message). Found by trying bad inputs
# systematically (recipes, --set values, tracking URIs, paths, terminal settings).
BAD_INPUTS = {
    "markup in a name": (lambda t: ["recipe", "validate", SMOKE, "--set", "name=x[/]"], 2, "name"),
    "path in a name": (lambda t: ["recipe", "validate", SMOKE, "--set", "name=../../etc/x"], 2, "name"),
    "duplicate key": (lambda t: ["recipe", "validate", _write(t / "d.yaml", "name: a\ntrain: {steps: 1}\n"
                                                                       "train: {steps: 2}\n")], 2, "appears twice"),
    "bool for a number": (lambda t: ["recipe", "validate", SMOKE, "--set", "train.steps=true"], 2, "expected a number"),
    "infinite lr": (lambda t: ["recipe", "validate", SMOKE, "--set", "optim.base_lr=.inf"], 2, "optim.base_lr"),
    "betas out of range": (lambda t: ["recipe", "validate", SMOKE, "--set", "optim.betas=[2, -1]"], 2, "optim.betas"),
    "recall at zero": (lambda t: ["recipe", "validate", SMOKE, "--set", "eval.recall_at=[0]"], 2, "eval.recall_at"),
    "empty experiment": (lambda t: ["recipe", "validate", SMOKE, "--set", "tracking.experiment="], 2,
                         "tracking.experiment"),
    "unknown tracking scheme": (lambda t: ["run", SMOKE, "--set", "tracking.uri=notaurl://x"], 2,
                                "not a store MLflow can use"),
    "recipe is a folder": (lambda t: ["recipe", "validate", str(t)], 2, "is a folder"),
    "path too long": (lambda t: ["recipe", "validate", "x" * 300 + ".yaml"], 2, "cannot read the recipe"),
    "extends too deep": (lambda t: ["recipe", "validate", _deep_extends(t, 20)], 2, "chain longer than"),
    "yaml nests too deep": (lambda t: ["recipe", "validate", _write(t / "n.yaml", "name: a\nx: " + "[" * 2000)], 2,
                            "r"),
    "empty --cluster": (lambda t: ["run", SMOKE, "--cluster", ""], 2, "--cluster needs a profile name"),
    "--detach without a scheduler": (lambda t: ["run", SMOKE, "--detach"], 2, "--detach needs a scheduler"),
    "garbage tracking uri": (lambda t: ["status", "--tracking-uri", "garbage"], 1, "not a store MLflow can use"),
    "file: tracking uri": (lambda t: ["status", "--tracking-uri", f"file://{t}"], 1, "not a store MLflow can use"),
    "sqlite store is random bytes": (lambda t: ["status", "--tracking-uri",
                                                f"sqlite:///{_write(t / 'x.db', bytes(range(256)) * 8)}"], 1,
                                     "is not an SQLite database"),
    "sqlite store is a folder": (lambda t: ["logs", "--tracking-uri", f"sqlite:///{t}"], 1, "is a folder"),
    "sqlite store is empty": (lambda t: ["cancel", "--tracking-uri", f"sqlite:///{_write(t / 'e.db', b'')}"], 1,
                              "not an MLflow store"),
    "output_dir not writable": (lambda t: ["run", SMOKE, "--set", "output_dir=/proc/nope",
                                           "--set", f"tracking.uri=sqlite:///{t}/m.db"], 1,
                                "/proc/nope"),
    "ablate without components": (lambda t: ["ablate"], 2, "name at least one of image_aug"),
    "ablate an unknown component": (lambda t: ["ablate", "--components", "aug,nope"], 2,
                                    "unknown nope; the recipe's components are image_aug"),
    "ablate a recipe without components": (lambda t: ["ablate", SMOKE, "--components", "aug"], 2,
                                           "none (add an ablation: section)"),
    "ablate with bad seeds": (lambda t: ["ablate", "--components", "aug", "--seeds", "a,b"], 2, "--seeds 'a,b'"),
    "ablation override of an unknown key": (lambda t: ["recipe", "validate", SMOKE, "--set",
                                                       "ablation.components={x: {model.interactio: late}}"], 2,
                                            "ablation.components.x: model.interactio: unknown key"),
    "eval a checkpoint that is not there": (lambda t: ["eval", str(t / "nope.pt")], 1, "no such file or folder"),
    "eval a folder without model.pt": (lambda t: ["eval", str(t)], 1, "holds no model.pt"),
    "eval a model.pt with no recipe": (lambda t: ["eval", _write(t / "m.pt", b"x"), "-d", str(t)], 1,
                                       "--recipe RECIPE.yaml"),
    "eval a file that is no state dict": (lambda t: ["eval", _write(t / "m.pt", b"x"), "--recipe", SMOKE, "-d",
                                                     str(t), "--set", f"tracking.uri=sqlite:///{t}/m.db"], 1,
                                          "is not a model.pt state dict"),
    "eval a set that is not there": (lambda t: ["eval", _write(t / "m.pt", b"x"), "--recipe", SMOKE, "-d",
                                                str(t / "wds_nope")], 1, "wds_nope: no such folder"),
    "eval two sets of one name": (lambda t: ["eval", _write(t / "m.pt", b"x"), "--recipe", SMOKE, "-d",
                                             _mkdir(t / "a" / "wds"), "-d", _mkdir(t / "b" / "wds")], 1,
                                  "two evaluation sets are named 'wds'"),
    "eval a run id in an empty experiment": (lambda t: ["eval", "0123abcd", "--tracking-uri",
                                                        f"sqlite:///{_write(t / 'e.db', b'')}"], 1, "not an MLflow store"),
    "limit too large": (lambda t: ["status", "--limit", "50001"], 2, "--limit"),
    "infinite timeout": (lambda t: ["status", "--tracking-timeout", "inf"], 2, "--tracking-timeout"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_leaves_nothing(name: str, tmp_path: Path) -> None:
    build, code, fragment = BAD_INPUTS[name]
    argv = build(tmp_path)
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    res = run_cli(*argv, cwd=tmp_path, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out and "unexpected" not in out, out
    assert fragment in res.stderr, res.stderr
    assert res.stderr.count("error:") + res.stderr.count("Error:") == 1, res.stderr
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")) == before


def test_a_web_server_that_is_not_mlflow_is_named(tmp_path: Path) -> None:
    with _NotMlflow() as url:
        res = run_cli("status", "--tracking-uri", url, cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "answered HTTP 404" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_errors_still_show_with_a_zero_terminal_width(tmp_path: Path) -> None:
    res = run_cli("recipe", "validate", SMOKE, "--set", "train.stepz=1", cwd=tmp_path, env={"COLUMNS": "0"})
    assert res.returncode == 2 and "train.stepz" in res.stderr and "unknown key" in res.stderr, res.stderr


def test_help_rewraps_paragraphs_and_keeps_brackets(tmp_path: Path) -> None:
    res = run_cli("reproduce", "--help", cwd=tmp_path, env={"COLUMNS": "80"})
    lines = [ln.strip() for ln in res.stdout.splitlines()]
    # One docstring paragraph, filled to the terminal: no line holds only the tail of a source line.
    assert res.returncode == 0 and "one and what" not in lines and "step where the loss" not in lines, res.stdout
    assert any(ln.startswith("Rebuild a tracked run") and len(ln) > 70 for ln in lines), res.stdout
    res = run_cli("run", "--help", cwd=tmp_path, env={"COLUMNS": "100"})
    assert "[lists]" in res.stdout, res.stdout  # option help is not read as rich markup
