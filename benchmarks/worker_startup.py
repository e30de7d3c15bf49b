"""A pretraining worker's start-up time: from the launch of its process to its first training step.

    .venv/bin/python benchmarks/worker_startup.py [--python OTHER_VENV/bin/python] [--runs 2] [--read-only-home]

Runs the real pretraining job (jobs.train.pretrain under torchrun, 2 CPU workers, DeepSpeed ZeRO-2, gloo) on
generated data, each time with an empty torch extensions folder (TORCH_EXTENSIONS_DIR, where DeepSpeed
JIT-compiles its CPU shm collective op when the environment does not hold it prebuilt): the cold build cache of
a fresh environment, a new node or a new container. Reports per run the seconds from the torchrun launch to the
first step's log line (log_every 1), and what was compiled into the extensions folder (nothing = no compile).

--python: the interpreter of the environment to measure (its torch and deepspeed); the code is this checkout's.
--read-only-home: HOME is a read-only tmpfs (root only: mounted and unmounted here), as on clusters whose home
  is read-only on compute nodes; the extensions folder stays writable and empty.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from filipctl.contract import ENV_EVENTS, JOB_ENV, RunDir, free_port, worker_args  # noqa: E402
from filipctl.recipes import load_recipe, recipe_to_dict  # noqa: E402


def prepared_run_dir(tmp: Path, sets: list[str]) -> RunDir:
    """A pretraining stage folder over generated data, the data stage already run."""
    from jobs.data.prepare import run as prepare_data

    recipe = load_recipe(ROOT / "recipes/smoke.yaml", [
        "train.steps=3", "train.log_every=1", "train.checkpoint_every=1000", "optim.warmup_steps=1",
        f"data.train={tmp / 'data' / 'train'}", f"data.eval={tmp / 'data' / 'eval'}",
        "data.synthetic.train_samples=400", "data.synthetic.eval_samples=10", "data.synthetic.samples_per_shard=100",
        *sets])
    run_dir = RunDir(tmp / "stage")
    run_dir.root.mkdir(parents=True)
    run_dir.recipe.write_text(json.dumps(recipe_to_dict(recipe)))
    prepare_data(recipe, run_dir)
    return run_dir


def one_start(python: str, run_dir: RunDir, tmp: Path, home: Path | None, i: int) -> dict[str, object]:
    """One launch of the job with an empty extensions folder -> seconds to the first step, what was compiled."""
    extensions = tmp / f"torch_extensions_{i}"
    extensions.mkdir()
    events = tmp / f"events_{i}.jsonl"
    for stale in (run_dir.checkpoints, run_dir.model):  # every run starts from step 0, not from a checkpoint
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV and k != "XDG_CACHE_HOME"}
    env.update({"TORCH_EXTENSIONS_DIR": str(extensions), ENV_EVENTS: str(events), "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1"})
    if home is not None:
        env["HOME"] = str(home)
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "jobs.train.pretrain", *worker_args(run_dir)]
    log = tmp / f"job_{i}.log"
    t0 = time.time()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"run {i}: the job failed (exit {rc}); its log: {log}\n" + log.read_text()[-3000:])
    steps = [json.loads(line) for line in events.read_text().splitlines() if '"done"' in line]
    first = min(e["t"] for e in steps if e.get("done") == 1)
    compiled = sorted(str(p.relative_to(extensions)) for p in extensions.rglob("*.so"))
    text = log.read_text()
    return {"first_step_s": first - t0, "job_s": wall, "compiled": compiled,
            "build_lines": [m for m in ("Building extension", "Loading extension", "ninja") if m in text]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the environment's interpreter")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--read-only-home", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filip-startup-"))
    run_dir = prepared_run_dir(tmp, args.sets)
    home = None
    if args.read_only_home:
        home = tmp / "home"
        home.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)], check=True)
    probe = subprocess.run([args.python, "-c", "from deepspeed.git_version_info import installed_ops as o; "
                            "print(bool(o.get('deepspeed_shm_comm')))"], capture_output=True, text=True,
                           env={**os.environ, "DS_ACCELERATOR": "cpu"})
    prebuilt = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?"
    rows = []
    try:
        for i in range(args.runs):
            row = one_start(args.python, run_dir, tmp, home, i)
            rows.append(row)
            print(f"run {i}: first step after {row['first_step_s']:.1f} s (job {row['job_s']:.1f} s), "
                  f"compiled: {', '.join(row['compiled']) or 'nothing'}", file=sys.stderr, flush=True)
    finally:
        if home is not None:
            subprocess.run(["umount", str(home)], check=False)
    print(f"\nenvironment {Path(args.python).parent.parent}: shm op prebuilt {prebuilt}; "
          f"HOME {'read-only tmpfs' if home else 'as is'}; empty TORCH_EXTENSIONS_DIR each run\n")
    print("| run | launch -> first step, s | whole job (3 steps), s | compiled at start |")
    print("|---|---|---|---|")
    for i, row in enumerate(rows):
        print(f"| {i} | {row['first_step_s']:.1f} | {row['job_s']:.1f} | {', '.join(row['compiled']) or 'nothing'} |")


if __name__ == "__main__":
    main()
