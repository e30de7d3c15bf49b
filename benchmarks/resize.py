"""A run continued at another world size against the straight run, and against what seeds move (issue 22).

    .venv/bin/python benchmarks/resize.py [--out runs/resize] [--steps 40]

The smoke recipe at 40 steps (checkpoint every 10, loss logged every step, 2 loader workers per rank, both
augmentations, eval on), through the real CLI on the local backend:
  straight    2 workers, seeds 0, 1, 2 (seed 0 is the reference; seeds 1-2 measure what a seed moves)
  2-1-2       seed 0: 2 workers to step 20, 1 worker (2 accumulated micro-batches) to 30, 2 to the end
  2-4-2       seed 0: 2 workers to step 20, 4 workers (half micro-batches) to 30, 2 to the end
Each segment stops after its checkpoint (FILIPCTL_STOP_AT_STEP) and the next `filipctl run` continues the same
stage with another train.workers. Prints the per-step loss difference to the reference, the seed spread at the
same steps, and the held-out metrics side by side; writes everything to OUT/resize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("i2t_R1", "t2i_R1", "zeroshot_top1", "finegrained_R1")


def overrides(folder: Path, steps: int, seed: int) -> list[str]:
    sets = {"train.steps": steps, "train.checkpoint_every": 10, "train.log_every": 1, "optim.warmup_steps": 5,
            "train.seed": seed, "data.synthetic.train_samples": 600, "data.synthetic.eval_samples": 100,
            "data.synthetic.samples_per_shard": 100, "data.loader_workers": 2, "data.augment": "true",
            "data.text_augment": "true", "data.train": folder / "data" / "train",
            "data.eval": folder / "data" / "eval", "output_dir": folder / "runs",
            "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}"}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def run(folder: Path, steps: int, seed: int, plan: list[tuple[int, int | None]]) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for workers, stop in plan:
        env = {**os.environ, **({"FILIPCTL_STOP_AT_STEP": str(stop)} if stop else {})}
        res = subprocess.run([sys.executable, "-m", "filipctl.cli", "run", str(ROOT / "recipes/smoke.yaml"),
                              *overrides(folder, steps, seed), "--set", f"train.workers={workers}"],
                             cwd=folder, env=env, capture_output=True, text=True)
        if (res.returncode == 0) == bool(stop):
            sys.exit(f"{folder.name}: {workers} workers to {stop or 'the end'}: exit {res.returncode}\n"
                     f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def curves(folder: Path) -> tuple[dict[int, float], dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("filip")
    (pre,) = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
    (ev,) = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'eval'")
    loss = {m.step: m.value for m in client.get_metric_history(pre.info.run_id, "loss")}
    return loss, {k: v for k, v in ev.data.metrics.items() if k in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/resize")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    n = args.steps
    runs = {"straight seed 0": (0, [(2, None)]), "straight seed 1": (1, [(2, None)]),
            "straight seed 2": (2, [(2, None)]), "2-1-2": (0, [(2, 20), (1, 30), (2, None)]),
            "2-4-2": (0, [(2, 20), (4, 30), (2, None)])}
    seconds = {name: run(out / name.replace(" ", "-"), n, seed, plan) for name, (seed, plan) in runs.items()}
    results = {name: curves(out / name.replace(" ", "-")) for name in runs}
    ref, _ = results["straight seed 0"]
    seeds = [results[f"straight seed {s}"][0] for s in (0, 1, 2)]
    rows = []
    for step in range(1, n + 1):
        spread = max(c[step] for c in seeds) - min(c[step] for c in seeds)
        rows.append({"step": step, "reference": ref[step], "seed_spread": spread,
                     **{name: results[name][0][step] - ref[step] for name in ("2-1-2", "2-4-2")}})
    print("| step | loss (2 workers, seed 0) | 2-1-2 minus it | 2-4-2 minus it | seed spread (max-min, seeds 0-2) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["step"] in (1, 10, 19, 20, 21, 22, 25, 30, 31, 35, 40):
            print(f"| {r['step']} | {r['reference']:.6f} | {r['2-1-2']:+.2e} | {r['2-4-2']:+.2e} | "
                  f"{r['seed_spread']:.2e} |")
    after = [r for r in rows if r["step"] > 20]
    for name in ("2-1-2", "2-4-2"):
        before = max(abs(r[name]) for r in rows if r["step"] <= 20)
        worst = max(abs(r[name]) for r in after)
        ratio = statistics.median(abs(r[name]) / r["seed_spread"] for r in after if r["seed_spread"])
        print(f"{name}: max |diff| steps 1-20 {before:.1e}, steps 21-{n} {worst:.2e}; median |diff| / seed spread "
              f"after the change {ratio:.1e}")
    print("\n| held-out | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for m in METRICS:
        print(f"| {m} | " + " | ".join(f"{results[name][1].get(m, float('nan')):.3f}" for name in runs) + " |")
    (out / "resize.json").write_text(json.dumps({"rows": rows, "metrics": {k: v[1] for k, v in results.items()},
                                                "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
