"""The Triton late-interaction kernels (models/late_interaction_triton.py) against the float64 reference, on the CPU.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1). Triton 3.8 reads that variable when `@triton.jit`
decorates a kernel, i.e. when the kernel module is imported (not when triton itself is), and the choice is then
fixed for the life of the process. So every interpreted case runs in one child process started with the variable
set; this pytest process never sees it. The child returns, per case, the worst error of each output and gradient
measured in units of its tolerance (<= 1 passes) plus the contract checks, and the tests below assert on them.

Tolerances: fp32 inputs, |kernel - reference| <= 1e-6 + 1e-5 |reference| (fp32 accumulation of d <= 300 products
and of at most B partner terms; the errors seen are ~1e-8). fp16 / bf16 inputs: within one unit of the dtype's
precision (rtol 2^-10 / 2^-7): the kernel accumulates in fp32 and rounds once, the reference is float64 on the same
rounded inputs (and upstream gradients). Two interpreter limits with bf16: its tl.dot multiplies bf16 bit patterns
(triton-lang/triton#11584), so the kernel upcasts the dot's operands to fp32 under the interpreter only (bf16 x bf16
products are exact in fp32, so the numbers are the GPU's); and its fp32 -> bf16 cast truncates where the GPU rounds
to nearest, so a bf16 result may sit a whole unit (not half) from the reference: the tolerance allows it.
Every case draws data whose maxima are separated by at least 1e-6 in float64 (about 100x the kernel's rounding),
so both sides pick the same winners.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# name -> (B_i, B_t, n1, n2, d, dtype, directions, KernelConfig fields, segment_mb, special)
CASES: dict[str, tuple] = {
    # The real token counts, padding on both sides, B_t = 5 over text blocks of 2 (the last block is short),
    # one image and one text with a single real token.
    "filip_tokens_both": (3, 5, 50, 77, 32, "fp32", "both", {"block_j": 2}, 256.0, "one_token"),
    "filip_tokens_i2t": (3, 5, 50, 77, 32, "fp32", "i2t", {"block_j": 2}, 256.0, "one_token"),
    "filip_tokens_t2i": (3, 5, 50, 77, 32, "fp32", "t2i", {"block_j": 2}, 256.0, "one_token"),
    # Odd sizes; the backward's sort buffers limited to one sample per launch (several segment chunks) and
    # its gathers two partners at a time (several steps, the last one short).
    "odd_small_chunked": (4, 3, 5, 7, 16, "fp32", "both", {"block_j": 2, "route_block_p": 2}, 1e-9, ""),
    "odd_small_i2t_chunked": (4, 3, 5, 7, 16, "fp32", "i2t", {"block_j": 2, "route_block_p": 2}, 1e-9, ""),
    "odd_small_t2i_chunked": (4, 3, 5, 7, 16, "fp32", "t2i", {"block_j": 2, "route_block_p": 2}, 1e-9, ""),
    # d not a power of two: several d-chunks in the forward (64 wide) and the backward (128 wide);
    # a text block (4) larger than B_t.
    "wide_d": (2, 3, 5, 6, 300, "fp32", "both", {"block_j": 4, "route_block_d": 128}, 256.0, ""),
    "single_tokens": (2, 2, 1, 1, 8, "fp32", "both", {"block_j": 1}, 256.0, ""),
    "fp16": (3, 4, 6, 9, 40, "fp16", "both", {"block_j": 3}, 256.0, ""),
    "bf16": (3, 4, 6, 9, 40, "bf16", "both", {"block_j": 3}, 256.0, ""),
    # Image 1 and text 2 have no real token: their rows / columns are 0 and they get no gradient.
    "empty_samples": (3, 4, 6, 9, 16, "fp32", "both", {"block_j": 2}, 256.0, "empty"),
}

TOLERANCE = {"fp32": (1e-6, 1e-5), "fp16": (1e-6, 2.0**-10), "bf16": (1e-5, 2.0**-7)}  # (atol, rtol)
MIN_GAP = 1e-6


# ----------------------------------------------------------------------------- the child (interpreter mode)


def _draw(spec: tuple, seed: int):
    """Inputs of one case: unit-norm real tokens, padding 5x larger (it would win any max it took part in)."""
    import torch
    import torch.nn.functional as F

    b_i, b_t, n1, n2, d, dtype_name, _, _, _, special = spec
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b_i, n1, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b_t, n2, d, generator=g, dtype=torch.float64), dim=-1)
    xm = torch.rand(b_i, n1, generator=g) < 0.7
    ym = torch.rand(b_t, n2, generator=g) < 0.35  # captions fill about a quarter of the context
    xm[:, 0] = True
    ym[:, 0] = True
    ym[0, -1] = True  # a real token in the last slot: the edge of the padded tile
    if special == "one_token":
        xm[0] = False
        xm[0, min(7, n1 - 1)] = True
        ym[1] = False
        ym[1, min(40, n2 - 1)] = True
    if special == "empty":
        xm[1] = False
        ym[2] = False
    x = torch.where(xm[..., None], x, 5 * x)
    y = torch.where(ym[..., None], y, 5 * y)
    grads = torch.randn(2, b_i, b_t, generator=g, dtype=torch.float64)  # upstream dL/di2t, dL/dt2i
    return x.to(dtype), y.to(dtype), xm, ym, grads


def _min_gap(x, y, xm, ym) -> float:
    """Smallest distance, in float64, between the winner of a max and the runner-up (inf if nothing competes)."""
    import torch

    sim = torch.einsum("ikd,jrd->ijkr", x.double(), y.double())
    gaps = []
    for dim, mask in ((3, ym[None, :, None, :]), (2, xm[:, None, :, None])):
        s = sim.masked_fill(~mask, float("-inf"))
        if s.shape[dim] < 2:
            continue
        top = s.topk(2, dim=dim).values
        gap = top.select(dim, 0) - top.select(dim, 1)
        gaps.append(gap[torch.isfinite(gap)])
    gaps = torch.cat(gaps) if gaps else torch.empty(0)
    return float(gaps.min()) if gaps.numel() else float("inf")


def _worst(got, want, atol: float, rtol: float) -> float:
    """Worst |got - want| in units of the tolerance atol + rtol |want|."""
    return float(((got.double() - want).abs() / (atol + rtol * want.abs())).max()) if want.numel() else 0.0


def _run_case(spec: tuple) -> dict:
    import torch

    from models.interaction import late_interaction
    from models.late_interaction_triton import KernelConfig, late_interaction_triton

    b_i, b_t, n1, n2, d, dtype_name, directions, config_fields, segment_mb, special = spec
    want_i2t, want_t2i = directions != "t2i", directions != "i2t"
    for seed in range(100):  # the first draw whose maxima are well separated
        x, y, xm, ym, grads = _draw(spec, seed)
        gap = _min_gap(x, y, xm, ym)
        if gap > MIN_GAP:
            break
    x, y = x.requires_grad_(), y.requires_grad_()
    config = KernelConfig(**config_fields)
    i2t, t2i = late_interaction_triton(x, y, xm, ym, want_i2t, want_t2i, config=config, segment_mb=segment_mb)
    loss = sum((out.double() * g).sum() for out, g, w in ((i2t, grads[0], want_i2t), (t2i, grads[1], want_t2i)) if w)
    loss.backward()

    # The reference on the same (rounded) inputs in float64; empty samples are left out of it and checked apart.
    keep_i = xm.any(1) if special == "empty" else torch.ones(b_i, dtype=torch.bool)
    keep_j = ym.any(1) if special == "empty" else torch.ones(b_t, dtype=torch.bool)
    xd = x.detach().double()[keep_i].requires_grad_()
    yd = y.detach().double()[keep_j].requires_grad_()
    ri2t, rt2i = late_interaction(xd, yd, xm[keep_i], ym[keep_j])
    # Autograd hands the kernel dL/dout in the output's dtype: the reference takes the same rounded values.
    sub = grads.to(x.dtype).double()[:, keep_i][:, :, keep_j]
    sum((out * g).sum() for out, g, w in ((ri2t, sub[0], want_i2t), (rt2i, sub[1], want_t2i)) if w).backward()

    atol, rtol = TOLERANCE[dtype_name]
    pair = keep_i[:, None] & keep_j[None, :]
    result = {
        "min_gap": gap,
        "dtypes": [str(t.dtype) for t in (i2t, t2i, x.grad, y.grad)],
        "input_dtype": str(x.dtype),
        "i2t": _worst(i2t.detach()[pair].view(ri2t.shape), ri2t.detach(), atol, rtol) if want_i2t else 0.0,
        "t2i": _worst(t2i.detach()[pair].view(rt2i.shape), rt2i.detach(), atol, rtol) if want_t2i else 0.0,
        "gx": _worst(x.grad[keep_i], xd.grad, atol, rtol),
        "gy": _worst(y.grad[keep_j], yd.grad, atol, rtol),
        # The direction not asked for: zeros, no gradient.
        "unwanted_zero_no_grad": all(not o.requires_grad and not o.detach().any()
                                     for o, w in ((i2t, want_i2t), (t2i, want_t2i)) if not w),
        # Padding tokens get exactly zero gradient.
        "padding_grad_zero": bool(not x.grad[~xm].any() and not y.grad[~ym].any()),
    }
    if special == "empty":
        result["empty_scores_zero"] = bool(not i2t.detach()[~pair].any() and not t2i.detach()[~pair].any())
        result["empty_grads_zero"] = bool(not x.grad[~keep_i].any() and not y.grad[~keep_j].any())
    return result


def _child() -> None:
    """Entry point of the interpreter-mode child: every case, one JSON line on stdout."""
    from models.late_interaction_triton import INTERPRETED

    out: dict = {"interpreted": INTERPRETED}
    for name, spec in CASES.items():
        try:
            out[name] = _run_case(spec)
        except Exception:  # a failing case must not hide the others
            out[name] = {"error": traceback.format_exc()}
    print(json.dumps(out))


# ----------------------------------------------------------------------------- the child (GPU compiler, no GPU)


def _compile_report() -> dict:
    """Compile the kernels for sm_90 (Hopper) as a GPU run would, without a GPU: Triton ships its own ptxas.

    The interpreter runs the Python of a kernel, not its compilation, so this catches what only the compiler
    rejects, and reports per variant whether tl.dot became tensor-core instructions and what ptxas allots.
    """
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import models.late_interaction_triton as m

    cfg = m.KernelConfig()
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

    def forward(dt: str, want: tuple[bool, bool]) -> tuple:
        ptrs = {"x_ptr": dt, "y_ptr": dt, "i2t_ptr": dt, "t2i_ptr": dt, "xm_ptr": "*i8", "ym_ptr": "*i8",
                "r_ptr": "*i16", "k_ptr": "*i16"}
        consts = {"N1P": 64, "N2P": 128, "BLOCK_D": cfg.forward_block_d, "BLOCK_J": cfg.block_j, "WANT_I2T": want[0],
                  "WANT_T2I": want[1], "PRECISION": "ieee" if dt == "*fp32" else "tf32", "DOT_FP32": False}
        return m._forward_kernel, ptrs, consts, cfg.forward_warps

    def route(dt: str, dense: bool, segment: bool) -> tuple:
        ptrs = {"out_ptr": dt, "other_ptr": dt, "w_own_ptr": "*fp32", "w_other_ptr": "*fp32", "g_dense_ptr": "*fp32",
                "g_seg_ptr": "*fp32", "idx_ptr": "*i16", "seg_start_ptr": "*i32", "seg_end_ptr": "*i32",
                "seg_ptr": "*i32"}
        consts = {"BLOCK_P": cfg.route_block_p, "BLOCK_D": cfg.route_block_d, "DENSE": dense, "SEGMENT": segment}
        return m._route_kernel, ptrs, consts, cfg.route_warps

    variants = {  # FILIP shapes (n1 = 50 -> 64, n2 = 77 -> 128, d = 256), default KernelConfig
        "forward_bf16_both": forward("*bf16", (True, True)),
        "forward_fp32_i2t": forward("*fp32", (True, False)),
        "route_bf16_both": route("*bf16", True, True),
        "route_fp16_segment": route("*fp16", False, True),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fn, ptrs, consts, warps) in variants.items():
            try:
                signature = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "i32") for p in fn.params}
                kernel = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": warps})
                ptx = kernel.asm["ptx"]
                Path(tmp, "k.ptx").write_text(ptx)
                info = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(Path(tmp, "k.ptx")), "-o", os.devnull],
                                      capture_output=True, text=True, check=True).stderr
                out[name] = {"tensor_cores": "wgmma" in ptx or "mma.sync" in ptx,
                             "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
                             "registers": int(re.search(r"Used (\d+) registers", info).group(1))}
            except Exception:
                out[name] = {"error": traceback.format_exc()}
    print(json.dumps(out))


# ----------------------------------------------------------------------------- the tests (this process)


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_late_interaction_triton import _child; _child()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["interpreted"], "the child did not run the kernels in interpreter mode"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(results: dict, name: str) -> None:
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["min_gap"] > MIN_GAP, "no draw with well-separated maxima: the comparison would be about ties"
    for key in ("i2t", "t2i", "gx", "gy"):
        assert r[key] <= 1.0, f"{name}: {key} off by {r[key]:.3g}x its tolerance {TOLERANCE[CASES[name][5]]}"
    assert r["dtypes"] == [r["input_dtype"]] * 4, "outputs and gradients come back in the input dtype"
    assert r["padding_grad_zero"], "a padding token received gradient"


@pytest.mark.parametrize("name", [n for n, spec in CASES.items() if spec[6] != "both"])
def test_direction_not_asked_for_is_zero_without_gradient(results: dict, name: str) -> None:
    assert "error" not in results[name], results[name].get("error")
    assert results[name]["unwanted_zero_no_grad"]


def test_sample_without_real_tokens_scores_zero_and_gets_no_gradient(results: dict) -> None:
    r = results["empty_samples"]
    assert "error" not in r, r.get("error")
    assert r["empty_scores_zero"] and r["empty_grads_zero"]


def test_kernels_compile_for_hopper_with_tensor_cores_and_no_spills(tmp_path: Path) -> None:
    """The compiled path, which the interpreter never takes: sm_90 PTX through Triton's bundled ptxas.

    The bf16 forward must run its dot products on the tensor cores (wgmma), and the default launch shapes must not
    spill registers at FILIP's shapes (KernelConfig's defaults were chosen from this report). The fp32 forward
    (IEEE products, for exactness) compiles to FMAs and spills; it is only required to compile.
    """
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_late_interaction_triton import _compile_report; "
                           "_compile_report()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
    assert report["forward_bf16_both"]["tensor_cores"]
    for name in ("forward_bf16_both", "route_bf16_both", "route_fp16_segment"):
        assert report[name]["spill_bytes"] == 0, f"{name} spills: {report[name]}"


def test_cpu_tensors_without_interpreter_are_refused() -> None:
    """Outside the interpreter the kernels need CUDA: a CPU call fails in one line, before any launch."""
    code = ("import torch\nfrom models.late_interaction_triton import late_interaction_triton\n"
            "try:\n    late_interaction_triton(torch.zeros(1, 2, 16), torch.zeros(1, 3, 16))\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "CUDA" in proc.stdout
