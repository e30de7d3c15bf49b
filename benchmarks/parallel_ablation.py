"""Independent stages side by side: `filipctl ablate --components aug,late_interaction` on the local backend with
`cluster.local.max_parallel` 1 and 2, each into its own folder and store.

Reports, for each: the wall time, the most pretraining stages that were running at the same moment (from the
state index: when each stage was seen running and when it ended) and whether the two ablation tables are
identical, value for value (ablation.json rows). Tiny step counts by default; --steps for longer runs.

    .venv/bin/python benchmarks/parallel_ablation.py [--steps 40] [--folder /tmp/parallel-ablation]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(folder: Path, max_parallel: int, steps: int) -> tuple[float, dict]:
    sets = {"train.steps": steps, "train.checkpoint_every": steps, "train.log_every": max(1, steps // 4),
            "optim.warmup_steps": 1, "data.synthetic.train_samples": 400, "data.synthetic.eval_samples": 100,
            "data.synthetic.samples_per_shard": 100, "data.train": folder.parent / "data" / "train",
            "data.eval": folder.parent / "data" / "eval", "output_dir": folder / "runs",
            "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}", "cluster.local.max_parallel": max_parallel}
    argv = [sys.executable, "-m", "filipctl.cli", "ablate", str(ROOT / "recipes/ablation.yaml"),
            "--components", "aug,late_interaction", "--json"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return wall, json.loads(res.stdout)


def most_at_once(folder: Path, stage: str) -> int:
    """The most `stage` stages running at one moment, from the state index's running_since / ended times."""
    con = sqlite3.connect(folder / "filipctl-state.db")
    spans = con.execute("SELECT DISTINCT stage_key, running_since, ended FROM stages WHERE stage = ? AND "
                        "running_since IS NOT NULL", (stage,)).fetchall()
    events = sorted([(s, 1) for _, s, _ in spans] + [(e, -1) for _, _, e in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--folder", default="/tmp/parallel-ablation")
    args = ap.parse_args()
    base = Path(args.folder)
    shutil.rmtree(base, ignore_errors=True)
    rows = {}
    for mp in (1, 2):
        folder = base / f"max_parallel_{mp}"
        folder.mkdir(parents=True)
        wall, result = run(folder, mp, args.steps)
        rows[mp] = result["rows"]
        print(f"max_parallel={mp}: {wall:6.1f} s wall, at most {most_at_once(folder, 'pretrain')} pretraining "
              f"stages running at once", flush=True)
    print("tables identical:", rows[1] == rows[2])
    for r1, r2 in zip(rows[1], rows[2]):
        print(f"  {r1['setting']:<24} i2t_R1 {r1['i2t_R1']:.4f} / {r2['i2t_R1']:.4f}   "
              f"zero-shot {r1['zeroshot_top1']:.4f} / {r2['zeroshot_top1']:.4f}")


if __name__ == "__main__":
    main()
