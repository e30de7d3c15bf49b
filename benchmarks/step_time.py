"""Training step time, late vs global interaction, same towers, 2 workers (the paper's mark: late = 1.06x global).

    .venv/bin/python benchmarks/step_time.py [--recipe recipes/smoke.yaml] [--steps 30] [--set key=value ...]

Runs the real pretraining job (jobs.train.pretrain under torchrun, DeepSpeed, gloo on CPU / NCCL on
GPU) once per setting on the same generated data and reports the mean compute step time
(forward, gather, loss, backward, optimizer step; data loading excluded; first steps skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from filipctl.contract import JOB_ENV, RunDir, free_port, read_result, worker_args  # noqa: E402
from filipctl.recipes import load_recipe, recipe_to_dict  # noqa: E402
from jobs.train.batch_layout import layout_for  # noqa: E402

SETTINGS = [
    ("global (CLIP)", ["model.interaction=global"]),
    ("late, fp32, 100% tokens", ["model.interaction=late", "model.gather_dtype=fp32", "model.token_keep=1.0"]),
    ("late, fp16, 25% tokens", ["model.interaction=late", "model.gather_dtype=fp16", "model.token_keep=0.25"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes/smoke.yaml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="filip-steptime-"))
    common = [f"train.steps={args.steps}", f"train.workers={args.workers}", f"train.checkpoint_every={10**6}",
              f"data.train={tmp / 'data' / 'train'}", f"data.eval={tmp / 'data' / 'eval'}",
              "data.synthetic.train_samples=2000", "data.synthetic.eval_samples=10",
              *args.sets]
    from jobs.data.prepare import run as prepare_data

    rows = []
    for name, sets in SETTINGS:
        recipe = load_recipe(args.recipe, [*common, *sets])
        run_dir = RunDir(tmp / name.replace(" ", "_").replace(",", "").replace("%", ""))
        run_dir.root.mkdir(parents=True)
        run_dir.recipe.write_text(json.dumps(recipe_to_dict(recipe)))
        prepare_data(recipe, run_dir)  # the data stage: generate once, index into the run folder
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "jobs.train.pretrain", *worker_args(run_dir)]
        env = {k: v for k, v in os.environ.items() if k not in JOB_ENV}  # nothing to report to
        subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = read_result(run_dir)["metrics"]
        rows.append((name, result["compute_step_s"]))
        print(f"{name}: {result['compute_step_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0][1]
    r = load_recipe(args.recipe, common)
    layout = layout_for(r.train.global_batch, r.train.micro_batch_size, args.workers)
    print(f"{r.name} towers, global batch {r.train.global_batch} = {layout.describe()}, {args.steps} steps, "
          f"ZeRO-{r.train.zero_stage}, {r.train.precision}\n")
    print("| loss | s / step | vs global |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
