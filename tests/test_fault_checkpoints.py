"""Checkpoints you can trust, under real faults: the real CLI, torchrun and DeepSpeed (2 CPU workers, ZeRO-2).

- A corrupt newest checkpoint (a model-states file cut in half after an interrupted run): the rerun names the
  file and why, resumes from the checkpoint before it and finishes.
- A disk that fills during a save (a small tmpfs mounted as output_dir): the run fails with one "no space left"
  line on the terminal, the previous checkpoint is intact and `latest` names it, no partial folder is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from jobs.train.checkpoint_files import MANIFEST, TMP_SUFFIX, checkpoint_problem, latest_step, step_folders
from tests.conftest import FILIPCTL, ROOT, run_cli

RECIPE = str(ROOT / "recipes/smoke.yaml")
# No eval stage (what is checked is pretraining), and no automatic restart: the fault must reach the user.
QUICK = ["--set", "eval.enabled=false", "--set", "train.max_restarts=0"]


def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path: Path,
                                                                          smoke_overrides: list[str]) -> None:
    args = ["run", RECIPE, *smoke_overrides, *QUICK, "--set", "train.checkpoint_every=5"]  # 20 steps
    # 1. A run interrupted (Ctrl-C) once it has checkpointed step 10 or later.
    with open(tmp_path / "first.out", "w") as out:
        proc = subprocess.Popen([*FILIPCTL, *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "COLUMNS": "200"},
                                # As from a terminal: a shell without job control hands its children SIGINT ignored.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        root = None
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None and root is None:
                root = next((p.parent for p in (tmp_path / "runs").glob("stages/pretrain-*/checkpoints/latest")
                             if latest_step(p.parent) >= 10), None)
                time.sleep(0.1)
            assert root is not None, "no checkpoint at step 10 appeared: " + (tmp_path / "first.out").read_text()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode != 0, (tmp_path / "first.out").read_text()
    bad = latest_step(root)
    assert 10 <= bad < 20 and checkpoint_problem(root / f"step{bad}") is None

    # 2. Real damage: half of the newest checkpoint's model-states file is gone.
    model_states = root / f"step{bad}" / "mp_rank_00_model_states.pt"
    size = model_states.stat().st_size
    with open(model_states, "r+b") as f:
        f.truncate(size // 2)

    # 3. The same command names the file and why, resumes from the checkpoint before it and finishes.
    t0 = time.time()
    res = run_cli(*args, cwd=tmp_path, timeout=900)
    rerun_s = time.time() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert (f"checkpoint step{bad} is not used: {model_states} does not load (truncated: {size // 2} of {size} bytes)"
            in res.stdout), res.stdout
    good = bad - 5
    assert f"resumed from {root}/step{good}" in res.stdout and "data restarts" not in res.stdout, res.stdout
    assert f"resumed from {root}/step{bad}" not in res.stdout
    summary = json.loads((root.parent / "result.json").read_text())["metrics"]
    assert summary["steps_run"] == 20 - good
    # Training passed step `bad` again and saved it anew: the damaged copy is gone, the new one verifies.
    assert checkpoint_problem(root / f"step{bad}") is None and (root / f"step{bad}" / MANIFEST).is_file()
    assert latest_step(root) == 20 and sorted(step_folders(root))[-1] == 20
    assert len(step_folders(root)) == 3  # train.keep_checkpoints defaults to 3
    print(f"rerun from a corrupt checkpoint: {rerun_s:.0f} s")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 128 MiB tmpfs: the smoke model's first checkpoint (85.5 MB: model states 21.4 MB + 2 x 32 MB optimizer
    shards) fits, a second one does not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)]).returncode:
            subprocess.run(["umount", "-l", str(disk)])  # a process still holds a file there: detach it anyway


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, smoke_overrides: list[str],
                                                               small_disk: Path) -> None:
    # 20 steps, a checkpoint every 10: step10 fits on the disk, step20 does not.
    res = run_cli("run", RECIPE, *smoke_overrides, *QUICK, "--set", f"output_dir={small_disk / 'runs'}",
                  cwd=tmp_path, timeout=900)
    assert res.returncode != 0, res.stdout + res.stderr
    (root,) = (small_disk / "runs").glob("stages/pretrain-*/checkpoints")
    folder = root / "step20"
    # One line on the terminal names the cause, the file system and the sizes; not torch's words for it.
    assert f"no space left on {small_disk} (tmpfs) writing {folder}: needs about 86 MB, " in res.stderr, res.stderr
    assert "MB free" in res.stderr and "Traceback" not in res.stderr
    for raw in ("basic_ios", "PytorchStreamWriter", "iostream error"):
        assert raw not in res.stderr, res.stderr
    # The previous checkpoint is intact and `latest` names it; the failed save left nothing behind.
    assert latest_step(root) == 10 and checkpoint_problem(root / "step10") is None
    assert sorted(step_folders(root)) == [10]
    assert not list(root.glob(f"*{TMP_SUFFIX}")), list(root.iterdir())
    assert not (root.parent / "model.pt").exists()
