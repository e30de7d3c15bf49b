"""Late interaction, forward + backward, against its floor: one forward matmul of the same shapes.

    .venv/bin/python benchmarks/similarity.py [--batches 32 64 128 256] [--repeat 5] [--dtype fp32 bf16] [--json]

The floor: the token-wise max's backward only routes each gradient to the token that won the max (a gather of
B^2 (n1 + n2) d multiply-adds, ~30x less than the forward's B^2 n1 n2 d), so forward + backward cannot cost much
less than the one product [B n1, d] x [d, B n2]. `x floor` = (late interaction forward + backward) / (that matmul),
both directions, text padding as real captions have it, in the same process, interleaved, median of --repeat.

Columns per batch: filipctl's late interaction (`models.interaction.late_interaction_chunked`, the blocked CPU
kernel, 256 MB block budget), the naive einsum reference (`late_interaction`, [B, B, n1, n2] in memory), one
matmul; peak memory of a fresh process during one forward + backward, inputs excluded; accuracy against the
float64 reference (largest absolute error of the similarities and of the gradients, the gradients relative to
their largest element), checked at every batch up to 128 (the float64 reference needs 8 GB at 256).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N1, N2, D, REAL_TEXT = 50, 77, 256, 20
DTYPES = ("fp32", "bf16", "fp16")


ALL_REAL = False  # --all-real: every text token real (nothing to cut)


def _inputs(b: int, dtype_name: str):
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    g = torch.Generator().manual_seed(b)
    x = F.normalize(torch.randn(b, N1, D, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, N2, D, generator=g, dtype=torch.float64), dim=-1)
    xm = torch.ones(b, N1, dtype=torch.bool)
    # Captions of 5..35 real tokens (about 20 on average) in 77 slots, as tokenized web captions are.
    lengths = torch.randint(5, 36, (b,), generator=g)
    ym = torch.arange(N2)[None, :] < lengths[:, None]
    if ALL_REAL:
        ym[:] = True
    return x.to(dtype), y.to(dtype), xm, ym, x, y


def _measure(b: int, repeat: int, dtype_name: str, naive: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from models.interaction import late_interaction, late_interaction_chunked

    x, y, xm, ym, x64, y64 = _inputs(b, dtype_name)
    x.requires_grad_()
    y.requires_grad_()
    a, c = x.detach().reshape(-1, D), y.detach().reshape(-1, D).t()

    def matmul() -> None:
        a @ c

    def run(fn) -> None:
        i2t, t2i = fn(x, y, xm, ym)
        (i2t.float().sum() + t2i.float().sum()).backward()
        x.grad = y.grad = None

    kinds = {"matmul": matmul, "late": lambda: run(late_interaction_chunked),
             "late_fwd": lambda: late_interaction_chunked(x, y, xm, ym)}  # the forward alone, winners kept
    if naive:
        kinds["naive"] = lambda: run(late_interaction)
    for f in kinds.values():
        f()  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeat):  # interleaved, so that a slow moment of the machine hits every kind alike
        for k, f in kinds.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {"batch": b, "dtype": dtype_name, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    if b <= 128:
        out.update(_accuracy(x, y, xm, ym, x64, y64))
    return out


def _accuracy(x, y, xm, ym, x64, y64) -> dict:
    """Largest errors of the similarities and (relative) of their gradients against the float64 reference."""
    import torch

    from models.interaction import late_interaction, late_interaction_chunked

    g = torch.Generator().manual_seed(1)
    ref_in = (x64.clone().requires_grad_(), y64.clone().requires_grad_())
    ref = late_interaction(*ref_in, xm, ym)
    w = [torch.randn(ref[0].shape, generator=g, dtype=torch.float64) for _ in range(2)]
    ref_g = torch.autograd.grad(sum((r * wi).sum() for r, wi in zip(ref, w)), ref_in)
    xi, yi = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out = late_interaction_chunked(xi, yi, xm, ym)
    out_g = torch.autograd.grad(sum((o.double() * wi.to(o.dtype).double()).sum() for o, wi in zip(out, w)), (xi, yi))
    sim_err = max(float((o.double() - r).abs().max()) for o, r in zip(out, ref))
    grad_err = max(float((o.double() - r).abs().max() / r.abs().max()) for o, r in zip(out_g, ref_g))
    return {"sim_abs_err": sim_err, "grad_rel_err": grad_err}


def _measure_peak(kind: str, b: int, dtype_name: str) -> float:
    """Peak RSS growth (MB) above the inputs during one forward + backward, in a fresh process."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import similarity
from similarity import _inputs
similarity.ALL_REAL = {ALL_REAL}
from models.interaction import late_interaction, late_interaction_chunked
x, y, xm, ym, _, _ = _inputs({b}, {dtype_name!r})
x.requires_grad_(); y.requires_grad_()
fn = late_interaction if {kind!r} == "naive" else late_interaction_chunked
# Touch the kernels once on a tiny problem so that their workspace is not counted.
o = fn(x[:2], y[:2], xm[:2], ym[:2]); (o[0].float().sum() + o[1].float().sum()).backward(); x.grad = y.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
i2t, t2i = fn(x, y, xm, ym)
(i2t.float().sum() + t2i.float().sum()).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _device() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    ap.add_argument("--naive-up-to", type=int, default=256, help="largest batch to run the naive einsum at")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--all-real", action="store_true", help="every text token real: no padding to cut")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--child", nargs=2, metavar=("BATCH", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    args = ap.parse_args()
    global ALL_REAL
    ALL_REAL = args.all_real
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        b = int(args.child[0])
        print(json.dumps(_measure(b, args.repeat, args.child[1], b <= args.naive_up_to)))
        return

    rows = []
    for dtype_name in args.dtype:
        for b in args.batches:
            out = subprocess.run([sys.executable, __file__, "--child", str(b), dtype_name, "--repeat",
                                  str(args.repeat), "--naive-up-to", str(args.naive_up_to),
                                  *(["--all-real"] if args.all_real else []),
                                  *(["--threads", str(args.threads)] if args.threads else [])],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if not args.no_memory:
                row["late_peak_mb"] = _measure_peak("late", b, dtype_name)
                if "naive_s" in row:
                    row["naive_peak_mb"] = _measure_peak("naive", b, dtype_name)
            rows.append(row)
            print(f"{dtype_name} B={b} done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    tokens = "every text token real" if ALL_REAL else "captions of 5-35 real tokens"
    print(f"late interaction forward + backward, both directions, n1={N1}, n2={N2} ({tokens}), "
          f"d={D}; {_device()}\n")
    print("| dtype | batch | one matmul s | filipctl late s | of it forward s | x floor | naive einsum s | "
          "naive / filipctl | filipctl peak MB | naive peak MB | |sim - fp64| | grad rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        naive = r.get("naive_s")
        print(f"| {r['dtype']} | {r['batch']} | {r['matmul_s']:.3f} | {r['late_s']:.3f} | {r['late_fwd_s']:.3f} | "
              f"{r['late_s'] / r['matmul_s']:.2f} | {f(naive, '.3f')} | {f(naive and naive / r['late_s'], '.1f')} | "
              f"{f(r.get('late_peak_mb'), '.0f')} | {f(r.get('naive_peak_mb'), '.0f')} | "
              f"{f(r.get('sim_abs_err'), '.1e')} | {f(r.get('grad_rel_err'), '.1e')} |")


if __name__ == "__main__":
    main()
