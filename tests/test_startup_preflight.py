"""The pre-run check verifies what the jobs will write (the run folder, the checkpoint store, the build cache of
DeepSpeed's C++ op) with real write probes on real read-only mounts (tmpfs, mounted ro here: we are root), and a
job start compiles nothing when the environment holds the op prebuilt (scripts/env.sh)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from rich.console import Console

from filipctl.errors import FilipctlError
from filipctl.orchestration.pipeline import GraphRun
from filipctl.orchestration.preflight import deepspeed_shm_op_prebuilt, torch_extensions_dir
from filipctl.recipes import load_recipe
from tests.conftest import ROOT, run_cli

UNSET = ("XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR")


@contextlib.contextmanager
def read_only_mount(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def tiny_run(tmp_path: Path, *extra: str) -> list[str]:
    sets = {"train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 1, "optim.warmup_steps": 1,
            "data.synthetic.train_samples": 128, "data.synthetic.eval_samples": 20,
            "data.synthetic.samples_per_shard": 64, "data.train": tmp_path / "data" / "train",
            "data.eval": tmp_path / "data" / "eval", "output_dir": tmp_path / "runs",
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return ["run", str(ROOT / "recipes/smoke.yaml"), *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
            *extra]


def home_env(home: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return {**env, "HOME": str(home), **extra}


def test_read_only_home_fails_before_anything_runs_or_is_prebuilt_away(tmp_path: Path) -> None:
    """Without the op prebuilt: `run` fails at once, one line naming HOME's .cache and the fix, nothing
    submitted; with the fix (XDG_CACHE_HOME) the run finishes. With the op prebuilt: the run finishes as is and
    compiles nothing."""
    prebuilt = deepspeed_shm_op_prebuilt()
    with read_only_mount(tmp_path / "home") as home:
        if not prebuilt:
            t0 = time.time()
            res = run_cli(*tiny_run(tmp_path), cwd=tmp_path, env=home_env(home), timeout=300)
            out = res.stdout + res.stderr
            assert res.returncode != 0 and time.time() - t0 < 60, out
            lines = [line for line in out.splitlines() if line.strip()]
            assert len(lines) == 1 and f"{home}/.cache/torch_extensions" in lines[0], out
            assert "Read-only file system" in lines[0] and "XDG_CACHE_HOME" in lines[0], out
            assert not (tmp_path / "runs" / "stages").exists() and not (tmp_path / "data").exists()
            cache = tmp_path / "cache"
            res = run_cli(*tiny_run(tmp_path), cwd=tmp_path, env=home_env(home, XDG_CACHE_HOME=str(cache)), timeout=900)
            assert res.returncode == 0, res.stdout + res.stderr
            assert list(cache.glob("torch_extensions/*/deepspeed_shm_comm/*.so"))  # the compile went there
        else:
            extensions = tmp_path / "extensions"
            extensions.mkdir()
            res = run_cli(*tiny_run(tmp_path), cwd=tmp_path, env=home_env(home, TORCH_EXTENSIONS_DIR=str(extensions)),
                          timeout=900)
            assert res.returncode == 0, res.stdout + res.stderr
            assert not any(extensions.iterdir())  # nothing compiled at start


def test_unwritable_output_dir_fails_at_once(tmp_path: Path) -> None:
    with read_only_mount(tmp_path / "ro") as ro:
        res = run_cli(*tiny_run(tmp_path, "--set", f"output_dir={ro / 'runs'}"), cwd=tmp_path, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out
    assert f"cannot create the run folder {ro / 'runs'} (Read-only file system: {ro})" in out, out
    assert not (tmp_path / "data").exists()  # the data stage never ran


def _graph_run(tmp_path: Path, *sets: str) -> GraphRun:
    args = tiny_run(tmp_path, *[x for s in sets for x in ("--set", s)])
    recipe = load_recipe(ROOT / "recipes/smoke.yaml", [a for a in args[2:] if a != "--set"])
    return GraphRun({"": recipe}, Console(quiet=True))


def test_read_only_checkpoint_store_fails_naming_it(tmp_path: Path) -> None:
    run = _graph_run(tmp_path)
    (pretrain,) = [n for n in run.to_run() if n.stage.name == "pretrain"]
    run.preflight()  # all writable: passes
    with read_only_mount(pretrain.run_dir.checkpoints) as checkpoints:
        with pytest.raises(FilipctlError, match=f"cannot write the checkpoints of {pretrain.name} to {checkpoints} "
                                                 r"\(Read-only file system"):
            run.preflight()


def test_read_only_local_ray_storage_fails_naming_it(tmp_path: Path) -> None:
    with read_only_mount(tmp_path / "ray-store") as store:
        run = _graph_run(tmp_path, "cluster.backend=ray", f"cluster.ray.storage_path={store / 'ray'}")
        with pytest.raises(FilipctlError, match=f"cluster.ray.storage_path {store / 'ray'} "
                                                 r"\(Read-only file system"):
            run.preflight()


def test_build_cache_follows_torch_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert torch_extensions_dir() == tmp_path / ".cache" / "torch_extensions"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert torch_extensions_dir() == tmp_path / "xdg" / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert torch_extensions_dir() == tmp_path / "ext"
    # torch's own rule agrees (the default it computes, before its python-version subfolder)
    import torch.utils.cpp_extension as ext

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert Path(ext.get_default_build_root()) == (tmp_path / "xdg" / "torch_extensions").resolve()
