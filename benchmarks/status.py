"""How fast `filipctl status` answers on a store of many runs.

    .venv/bin/python benchmarks/status.py [--runs 1000] [--repeat 3]

Builds a fresh MLflow sqlite store with RUNS finished pipelines (3 stages each, key metrics logged)
through the project's own writer (filipctl.tracking.writer.Tracker, which also keeps the state index), then
times the real CLI, `filipctl status` for the 10 newest and for all runs, from the state index and,
for comparison, from MLflow alone (the index moved away).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(folder: Path, runs: int) -> str:
    from filipctl.states import State
    from filipctl.tracking.writer import Tracker

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri, "filip")
    t0 = time.time()
    for i in range(runs):
        parent = tracker.start_run(f"smoke-{i:05d}", "pipeline", "smoke", "local", tags={})
        for stage, metric, value in (("data", "train_pairs", 6000), ("pretrain", "final_loss", 1.0 + i / runs),
                                     ("eval", "zeroshot_top1", 0.4)):
            run = tracker.start_stage(parent, stage, "smoke", "local", metric)
            tracker.tag(run, "filipctl.job_id", str(folder / "logs" / f"{i}.{stage}.job.json"))
            tracker.log_metrics(run, {metric: value})
            tracker.set_state(run, State.COMPLETED)
        tracker.set_state(parent, State.COMPLETED)
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{runs} runs written ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return uri


def time_status(folder: Path, uri: str, limit: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "filipctl.cli", "status", "-n", str(limit), "--json",
                              "--tracking-uri", uri], cwd=folder, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(res.stderr)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="filip-status-"))
    uri = build(folder, args.runs)
    rows = []
    for limit in (10, args.runs):
        rows.append(("state index", limit, time_status(folder, uri, limit, args.repeat)))
    index = folder / "filipctl-state.db"
    index.rename(folder / "moved-away.db")
    for limit in (10, args.runs):
        rows.append(("MLflow only", limit, time_status(folder, uri, limit, args.repeat)))
    print(f"store: {args.runs} pipelines x 3 stages, sqlite; best of {args.repeat}, wall time of the whole CLI\n")
    print("| read from | runs shown | filipctl status s |")
    print("|---|---|---|")
    for source, limit, seconds in rows:
        print(f"| {source} | {limit} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
