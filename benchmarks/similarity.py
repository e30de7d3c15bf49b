"""Forward+backward time and peak memory of the late-interaction similarity: chunked vs naive einsum.

    .venv/bin/python benchmarks/similarity.py [--batches 32 64 128 256] [--repeat 3] [--dtype fp32]

Each measurement runs in a fresh subprocess so its peak resident memory (ru_maxrss, on CPU) or
peak CUDA allocation (on GPU) belongs to it alone; the inputs' own size is subtracted.
The matmul column is torch.matmul on the same FLOPs ([B*n1, d] @ [d, B*n2], three times
for forward + backward), so `rate vs matmul` = matmul time / similarity time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N1, N2, D = 50, 77, 256


def _measure(kind: str, b: int, repeat: int, dtype_name: str, memory_mb: float) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from models.interaction import late_interaction, late_interaction_chunked

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    x = F.normalize(torch.randn(b, N1, D, device=dev), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(b, N2, D, device=dev), dim=-1).to(dtype).requires_grad_()
    xm = torch.ones(b, N1, dtype=torch.bool, device=dev)
    ym = torch.rand(b, N2, device=dev) < 0.6
    ym[:, 0] = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        if kind == "matmul":
            a, c = x.detach().reshape(-1, D), y.detach().reshape(-1, D).t()
            for _ in range(3):  # forward + the two backward products
                (a @ c)
            return
        fn = late_interaction if kind == "naive" else (lambda *t: late_interaction_chunked(*t, memory_mb=memory_mb))
        i2t, t2i = fn(x, y, xm, ym)
        (i2t.float().sum() + t2i.float().sum()).backward()
        x.grad = y.grad = None

    step()  # warm-up (allocator, kernels)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    # On CPU, ru_maxrss is the whole process's high-water mark (the warm-up already set it):
    # the parent measures CPU peaks in a separate fresh process instead (_measure_cpu_peak).
    peak_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20 if cuda else None
    return {"kind": kind, "batch": b, "time_s": min(times), "peak_mb": peak_mb}


def _measure_cpu_peak(kind: str, b: int, dtype_name: str, memory_mb: float) -> float:
    """Peak RSS above the inputs for one forward+backward, in a fresh process."""
    code = f"""
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {str(ROOT)!r})
from models.interaction import late_interaction, late_interaction_chunked
torch.manual_seed(0)
x = F.normalize(torch.randn({b}, {N1}, {D}), dim=-1).requires_grad_()
y = F.normalize(torch.randn({b}, {N2}, {D}), dim=-1).requires_grad_()
xm = torch.ones({b}, {N1}, dtype=torch.bool); ym = torch.rand({b}, {N2}) < 0.6; ym[:, 0] = True
# Touch the kernels once on a tiny problem so their workspace is not counted.
late_interaction_chunked(x[:1], y[:1], xm[:1], ym[:1])[0].sum().backward(); late_interaction(x[:1], y[:1], xm[:1], ym[:1])[0].sum().backward()
x.grad = y.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {kind!r} == "naive":
    i2t, t2i = late_interaction(x, y, xm, ym)
else:
    i2t, t2i = late_interaction_chunked(x, y, xm, ym, memory_mb={memory_mb})
(i2t.sum() + t2i.sum()).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--memory-mb", type=float, default=256.0)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], int(args.child[1]), args.repeat, args.dtype, args.memory_mb)))
        return

    import torch

    rows = []
    for b in args.batches:
        res = {}
        for kind in ("naive", "chunked", "matmul"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(b), "--repeat", str(args.repeat),
                                  "--dtype", args.dtype, "--memory-mb", str(args.memory_mb)],
                                 capture_output=True, text=True, check=True)
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            if kind != "matmul" and not torch.cuda.is_available():
                res[kind]["peak_mb"] = _measure_cpu_peak(kind, b, args.dtype, args.memory_mb)
        flops = 3 * 2 * b * b * N1 * N2 * D
        rows.append({
            "batch": b,
            "naive_s": res["naive"]["time_s"], "chunked_s": res["chunked"]["time_s"],
            "naive_peak_mb": res["naive"]["peak_mb"], "chunked_peak_mb": res["chunked"]["peak_mb"],
            "matmul_s": res["matmul"]["time_s"],
            "chunked_gflops": flops / res["chunked"]["time_s"] / 1e9,
            "rate_vs_matmul": res["matmul"]["time_s"] / res["chunked"]["time_s"],
        })
        print(f"B={b} done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"late-interaction similarity, forward+backward, n1={N1}, n2={N2}, d={D}, {args.dtype}, "
          f"block budget {args.memory_mb:g} MB, {dev}\n")
    print("| local batch | naive einsum s | chunked s | naive peak MB | chunked peak MB | chunked GFLOP/s | rate vs matmul |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['naive_s']:.3f} | {r['chunked_s']:.3f} | {r['naive_peak_mb']:.0f} | "
              f"{r['chunked_peak_mb']:.0f} | {r['chunked_gflops']:.1f} | {r['rate_vs_matmul']:.2f} |")


if __name__ == "__main__":
    main()
