"""A tracking server down longer than MLflow's own client retries (about 4 minutes): does training notice?

A real `mlflow server` (sqlite behind it) is killed with SIGKILL once pretraining logged its first step and
started again `--outage` seconds later (default 330 s, with MLflow's default client retries, not reduced).
`filipctl run` (data, 2-worker pretraining, eval) goes on meanwhile; afterwards `filipctl status` sends what
waited. Reported: the run's exit status and time, pretraining's seconds per step next to a run with the server up
all along, what the CLI said, and what MLflow holds afterwards (every logged step's loss, no run left open).

    .venv/bin/python benchmarks/tracking_outage.py [--steps 200] [--outage 330] [--folder /tmp/tracking-outage]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_fault_tracking import MlflowServer  # noqa: E402 - the suite's real server, started and killed


def cli(folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "filipctl.cli", *args]


def run(folder: Path, steps: int, outage: float | None) -> dict:
    folder.mkdir(parents=True)
    server = MlflowServer(folder)
    server.start()
    sets = {"train.steps": steps, "train.checkpoint_every": 50, "train.log_every": 5, "optim.warmup_steps": 10,
            "data.synthetic.train_samples": 2000, "data.synthetic.samples_per_shard": 250,
            "data.train": folder / "data" / "train", "data.eval": folder / "data" / "eval",
            "output_dir": folder / "runs", "tracking.uri": server.uri}
    argv = cli(folder, "run", str(ROOT / "recipes/smoke.yaml"))
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "160"})
    killed_at = None
    try:
        if outage is not None:
            while killed_at is None:
                for events in (folder / "runs").glob("stages/pretrain-*/logs/pretrain.events.jsonl"):
                    if "loss" in events.read_text():
                        server.kill()
                        killed_at = time.time()
                time.sleep(0.5)
                if proc.poll() is not None:
                    raise SystemExit(proc.communicate())
        while proc.poll() is None:
            if killed_at and time.time() - killed_at >= outage and (server.proc is None or server.proc.poll() is not None):
                server.start()
                print(f"server back after {time.time() - killed_at:.0f} s", flush=True)
            time.sleep(1)
        out, err = proc.communicate()
        wall = time.time() - t0
        if killed_at and time.time() - killed_at < outage:
            time.sleep(outage - (time.time() - killed_at))
        if server.proc is None or server.proc.poll() is not None:
            server.start()
            print(f"server back after {time.time() - killed_at:.0f} s (the run had ended)", flush=True)
        status = subprocess.run(cli(folder, "status", "--tracking-uri", server.uri, "--tracking-timeout", "120"),
                                cwd=folder, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("filip")
        runs = client.search_runs([exp.experiment_id])
        (pre,) = [r for r in runs if r.data.tags.get("filipctl.stage") == "pretrain"]
        steps_logged = sorted(m.step for m in client.get_metric_history(pre.info.run_id, "loss"))
        (stage,) = (folder / "runs" / "stages").glob("pretrain-*")
        result = json.loads((stage / "result.json").read_text())["metrics"]
        return {"exit": proc.returncode, "wall_s": round(wall, 1), "s_per_step": result["train_time_s"] / result["steps_run"],
                "outage_s": outage, "cli_said": [ln for ln in out.splitlines() if "tracking" in ln or "done in" in ln],
                "stderr_tail": err[-500:], "status_exit": status.returncode,
                "statuses": sorted({r.info.status for r in runs}),
                "losses_in_mlflow": f"{len(steps_logged)} of {steps // 5} logged steps",
                "all_losses": steps_logged == list(range(5, steps + 1, 5))}
    finally:
        server.kill()
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--outage", type=float, default=330.0)
    ap.add_argument("--folder", default="/tmp/tracking-outage")
    args = ap.parse_args()
    root = Path(args.folder)
    shutil.rmtree(root, ignore_errors=True)
    for name, outage in (("server up", None), ("server down", args.outage)):
        print(name, json.dumps(run(root / name.replace(" ", "-"), args.steps, outage), indent=1), flush=True)


if __name__ == "__main__":
    main()
