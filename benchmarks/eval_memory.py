"""Peak memory of evaluation against the size of the set: features live on disk, scoring holds two blocks.

    .venv/bin/python benchmarks/eval_memory.py [--sizes 250,1000,4000] [--captions 3]

For each size N it writes a retrieval set in clip_benchmark's layout (N shapes images, `--captions`
captions each), then evaluates it with the smoke recipe's towers (random weights: the figures are
about memory and time, not accuracy) in a fresh process, through jobs.eval.evaluate's own code, and
reports the token features written to disk, the process's peak resident set (ru_maxrss, which
counts the memory-mapped feature pages: file-backed, the kernel evicts them under pressure) and its
peak anonymous resident memory (RssAnon sampled every 50 ms: what cannot be evicted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from filipctl.recipes import load_recipe
from jobs.eval.evaluate import Evaluation, evaluate_set
from jobs.eval.sets import open_benchmark
from models.filip import build_model

import threading
root, scratch = Path(sys.argv[1]), Path(sys.argv[2])
peak_anon = [0]
def sample():  # ru_maxrss counts the memory-mapped feature pages too (file-backed, evictable): track RssAnon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
recipe = load_recipe(sys.argv[3], ["eval.alignment_images=0", "model.similarity_memory_mb=64"])
torch.manual_seed(0)
model = build_model(recipe.model).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
enc = Evaluation.of(model, recipe, scratch, scratch / "maps")
# Keep the feature files to measure them: wrap FeatureFile.remove.
from jobs.eval import features as eval_features
sizes = {}
orig = eval_features.FeatureFile.remove
def measure(self):
    sizes[self.paths["tokens"].name] = sum(p.stat().st_size for p in self.paths.values() if p.exists())
    orig(self)
eval_features.FeatureFile.remove = measure
t0 = time.time()
ds = open_benchmark(str(root), "bench", "test", False)
flat, _ = evaluate_set(enc, ds, "smoke", "random")
print(json.dumps({"seconds": time.time() - t0, "feature_bytes": sum(sizes.values()),
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_before_kb": base,
                  "peak_anon_kb": peak_anon[0],
                  "R1": flat["bench.text_retrieval_recall_at_1"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250,1000,4000")
    ap.add_argument("--captions", type=int, default=3, choices=(1, 2, 3),
                    help="captions per image (the shapes generator has three wordings)")
    args = ap.parse_args()
    from tests.benchmark_sets import retrieval_set

    print("| images | captions | token features on disk MB | peak RSS MB | peak anonymous RSS MB | RSS before eval MB | eval s |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "bench"
            retrieval_set(root, n, captions_per_image=args.captions, per_shard=500)
            res = subprocess.run([sys.executable, "-c", PROBE, str(root), str(Path(tmp) / "features"),
                                  str(ROOT / "recipes" / "smoke.yaml")], capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                sys.exit(res.stderr)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {n} | {n * args.captions} | {r['feature_bytes'] / 2**20:.0f} | "
                  f"{r['peak_rss_kb'] / 1024:.0f} | {r['peak_anon_kb'] / 1024:.0f} | {r['rss_before_kb'] / 1024:.0f} | "
                  f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
