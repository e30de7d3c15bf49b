"""Does tracking cost training time? The same 2-worker pretraining (torchrun, DeepSpeed, the smoke model), logging
every step, once with tracking off (no spool: the job logs nothing) and once as `filipctl run` tracks it (the job
appends to its spool, a forwarder thread in this process sends the spool to an MLflow sqlite store as it grows).

The stage folder is made once by `filipctl run` (data stage and pretrain folder); each trial clears the pretrain
outputs and starts torchrun on it again. Trials alternate off/on to spread the machine's drift over both.
Reported per trial: wall seconds per step over the whole loop (train_time_s / steps from result.json: logging
included) and the mean compute step (compute_step_s); the ratio on/off of the medians.

    .venv/bin/python benchmarks/tracking_overhead.py [--steps 60] [--trials 3] [--folder /tmp/tracking-overhead]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(folder: Path, steps: int) -> Path:
    """A finished run of the recipe (eval off) -> the pretrain stage folder to train in again."""
    sets = {"train.steps": steps, "train.checkpoint_every": steps, "train.log_every": 1, "optim.warmup_steps": 5,
            "data.synthetic.train_samples": 1000, "data.synthetic.samples_per_shard": 250, "eval.enabled": "false",
            "data.train": folder / "data" / "train", "data.eval": folder / "data" / "eval",
            "output_dir": folder / "runs", "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}"}
    argv = [sys.executable, "-m", "filipctl.cli", "run", str(ROOT / "recipes/smoke.yaml")]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    res = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    (stage,) = (folder / "runs" / "stages").glob("pretrain-*")
    return stage


def trial(stage: Path, tracked: bool, uri: str, run_id: str) -> dict[str, float]:
    from filipctl.contract import ENV_RUN_ID, ENV_SPOOL, RunDir, free_port
    from filipctl.tracking.forwarder import Forwarder, stage_spool, write_stage_run
    from filipctl.tracking.store import open_store

    run_dir = RunDir(stage)
    for path in (run_dir.checkpoints, run_dir.tracking):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run_dir.model, run_dir.result):
        path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (ENV_SPOOL, ENV_RUN_ID)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    forwarder = None
    if tracked:
        write_stage_run(run_dir, uri, run_id)
        env.update({ENV_SPOOL: str(run_dir.spool), ENV_RUN_ID: run_id})
        client = open_store(uri)
        forwarder = Forwarder(client, lambda: [s for s in [stage_spool(run_dir, uri)] if s is not None],
                              interval_s=2.0).start()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "jobs.train.pretrain",
            "--workdir", str(stage)]
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-3000:] + res.stderr[-3000:])
    left = forwarder.stop(60.0) if forwarder else 0
    metrics = json.loads(run_dir.result.read_text())["metrics"]
    return {"wall_step_s": metrics["train_time_s"] / metrics["steps_run"], "compute_step_s": metrics["compute_step_s"],
            "records_left": left, "records": run_dir.spool.read_text().count("\n") if tracked else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--folder", default="/tmp/tracking-overhead")
    args = ap.parse_args()
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stage = prepare(folder, args.steps)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("filip").experiment_id
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(args.trials):
        for tracked in (False, True):
            run_id = client.create_run(exp, run_name=f"overhead-{i}").info.run_id
            t0 = time.perf_counter()
            r = trial(stage, tracked, uri, run_id)
            rows[tracked].append(r)
            print(f"trial {i} tracking {'on ' if tracked else 'off'}: {r['wall_step_s']:.4f} s/step wall, "
                  f"{r['compute_step_s']:.4f} s compute, {r['records']} records, {r['records_left']} left "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    med = {t: statistics.median(r["wall_step_s"] for r in rows[t]) for t in rows}
    comp = {t: statistics.median(r["compute_step_s"] for r in rows[t]) for t in rows}
    print(f"median wall s/step: off {med[False]:.4f}, on {med[True]:.4f}, ratio on/off {med[True] / med[False]:.3f}")
    print(f"median compute s/step: off {comp[False]:.4f}, on {comp[True]:.4f}, ratio {comp[True] / comp[False]:.3f}")


if __name__ == "__main__":
    main()
