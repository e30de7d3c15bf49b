"""Late interaction vs the global loss at CPU scale: which choices move the gap (issue 13, docs/filip-faithfulness.md).

    .venv/bin/python benchmarks/late_vs_global.py [--only NAME,...] [--out runs/late-vs-global]

Each configuration is the smoke recipe (300 steps, shapes set, seed 0) with a few `--set` overrides
(the 600-step ones are the length recipes/ablation.yaml trains for), run through the real CLI; the
stage graph caches every finished one, so a rerun only trains what is new. Prints one markdown row per
configuration from its eval stage: retrieval R@1 both ways, zero-shot top-1, fine-grained R@1 (true
caption vs captions differing in one attribute) overall and for position, and pointing accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> overrides of the smoke recipe. Each interaction gets the same sweep (no weakened baseline).
CONFIGS: dict[str, dict[str, str]] = {}
for inter in ("global", "late"):
    CONFIGS[f"{inter}"] = {"model.interaction": inter}
    CONFIGS[f"{inter} lr 3e-3"] = {"model.interaction": inter, "optim.base_lr": "3.0e-3"}
    CONFIGS[f"{inter} lr 1.2e-2"] = {"model.interaction": inter, "optim.base_lr": "1.2e-2"}
    CONFIGS[f"{inter} temp 0.02"] = {"model.interaction": inter, "model.init_temperature": "0.02"}
    CONFIGS[f"{inter} 600 steps"] = {"model.interaction": inter, "train.steps": "600", "optim.warmup_steps": "60"}
    CONFIGS[f"{inter} 2000 pairs"] = {"model.interaction": inter, "data.synthetic.train_samples": "2000"}
    # The temperature sweep again at 600 steps, the length recipes/ablation.yaml trains for.
    for temp in ("0.035", "0.02"):
        CONFIGS[f"{inter} 600 steps temp {temp}"] = {"model.interaction": inter, "train.steps": "600",
                                                     "optim.warmup_steps": "60", "model.init_temperature": temp}
    # Busier scenes (1-3 shapes instead of 1-2): more for a single pooled vector to hold.
    objects3 = {"model.interaction": inter, "train.steps": "600", "optim.warmup_steps": "60",
                "data.synthetic.max_objects": "3"}
    for temp in ("0.07", "0.035", "0.02"):
        CONFIGS[f"{inter} 600 steps 3 objects temp {temp}"] = {**objects3, "model.init_temperature": temp}
# On busier scenes: is the global baseline short of steps or of a learning rate (at its best temperature)?
_best = {"global": "0.07", "late": "0.02"}
for inter in ("global", "late"):
    base3 = {"model.interaction": inter, "optim.warmup_steps": "60", "data.synthetic.max_objects": "3",
             "model.init_temperature": _best[inter]}
    CONFIGS[f"{inter} 1200 steps 3 objects"] = {**base3, "train.steps": "1200"}
    for lr in ("3.0e-3", "1.2e-2"):
        CONFIGS[f"{inter} 600 steps 3 objects lr {lr}"] = {**base3, "train.steps": "600", "optim.base_lr": lr}
CONFIGS["late no image [CLS]"] = {"model.interaction": "late", "model.late_image_cls": "false"}
CONFIGS["late no [CLS] no [BOS]"] = {"model.interaction": "late", "model.late_image_cls": "false",
                                      "model.late_text_bos": "false"}

COLUMNS = ("i2t_R1", "t2i_R1", "zeroshot_top1", "finegrained_R1", "finegrained_position_R1", "pointing_acc")


def run(name: str, overrides: dict[str, str], out: Path) -> dict[str, float]:
    data = out / "data" / f"n{overrides.get('data.synthetic.train_samples', '6000')}"
    if "data.synthetic.max_objects" in overrides:
        data = data.with_name(f"{data.name}-objects{overrides['data.synthetic.max_objects']}")
    sets = {"output_dir": str(out / "runs"), "tracking.uri": f"sqlite:///{out / 'mlflow.db'}",
            "data.train": str(data / "train"), "data.eval": str(data / "eval"), **overrides}
    argv = [sys.executable, "-m", "filipctl.cli", "run", str(ROOT / "recipes" / "smoke.yaml"), "--json"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t0 = time.time()
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
        return {}
    metrics = json.loads(res.stdout)["metrics"].get("eval", {})
    print(f"  {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "late-vs-global"))
    args = ap.parse_args()
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    out = Path(args.out).resolve()
    rows = {}
    for name in names:
        rows[name] = run(name, CONFIGS[name], out)
        (out / "late_vs_global.json").write_text(json.dumps(rows, indent=1))
    print("| configuration | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, m in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * m[c]:.1f}" if c in m else "-" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
