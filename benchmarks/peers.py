"""Side by side with the tools a researcher would otherwise use: (a) the loss, (b) the loader. One run, one table each.

    .venv/bin/python benchmarks/peers.py [--only loss|loader] [--json]
        (a) [--batches 32 64 128 256] [--repeat 5] [--threads N]
        (b) [--samples 4096] [--per-shard 256] [--image-size 224] [--batch 32] [--timed 100] [--warmup 10]
            [--rounds 3] [--configs 1:0 1:1 1:2 2:0 2:1 2:2] [--recipe recipes/smoke.yaml] [--set key=value ...]
            [--data DIR]
        why (b) differs, one rank reading in its own process: --profile [--profile-batches 60]

(a) The loss, forward + backward, on the same features: random unit-norm tokens, x [B, 50, 256] (all real, as a
ViT-B/32's CLS + 49 patches) and y [B, 77, 256] with about 20 real tokens per caption (lengths drawn from 10..30,
real tokens first, as a tokenizer pads), pooled vectors [B, 256] for the global loss. Rows:
  matmul          one product [B*n1, d] x [d, B*n2], forward only: the floor of any late interaction (the
                  "x one matmul" columns divide by it);
  matmul, real tokens  the same product over the real text tokens only (about 20 of 77 per caption): the floor
                  of an implementation that leaves padded text slots out of the product;
  filipctl late   models.interaction.late_interaction_chunked, both directions, at its default block budget;
  filipctl loss   models.loss.FilipLoss(interaction="late") without a process group: the whole loss;
  x-clip late     x-clip's fine-grained (FILIP) similarity as lucidrains/x-clip computes it (see `xclip_late`);
  open_clip CLIP  open_clip.loss.ClipLoss on the pooled vectors: the global loss a CLIP user trains with.
The late rows take the gradient of a fixed random weighting of both [B, B] score matrices (every entry gets a
gradient, as under a cross-entropy); the loss rows take that of the loss. Time: every row of a batch size in one
process, `--repeat` rounds over the rows after a warm-up round, median per row, so that the ratios to the matmul
come from one run. Peak memory: a fresh process per row and batch size, the growth of the resident high-water mark
(ru_maxrss, reset first: see `loss_peak`) over the inputs and a warm-up on a 2-sample batch, as
benchmarks/similarity.py measures it. Before timing, every late row is checked against the float64 reference
(models.interaction.late_interaction) on a small padded batch.

(b) The loader: jobs.data.loader.TrainBatches against open_clip's own WebDataset pipeline,
open_clip_train.data.get_wds_dataset from the venv's open_clip_torch, on the same shards in img2dataset's layout
(written as benchmarks/loader.py writes them: jobs.data.synthetic + jobs.data.shards), with the same image
transform and tokenizer (filipctl's jobs.data.loader.image_transform and models.tokenizer.tokenize for the
recipe, given to get_wds_dataset as preprocess_img and tokenizer) so that only the pipelines differ. Each keeps
its own shuffle: filipctl the recipe's data.shuffle_buffer, open_clip its fixed 5000-sample buffer (1000 filled
before the first sample) after a seeded shard shuffle. open_clip_train 3.3.0 was written for webdataset <= 0.2.86;
webdataset 1.0 ends every shard with an empty EOF sample that open_clip's group_by_keys_nothrow does not expect
(KeyError 'fname'), so the one change made to open_clip is `tar_file_expander(..., eof_value=None)`, which gives
back the old behaviour. Each rank is its own process, the ranks of a world size running at once (RANK and
WORLD_SIZE in the environment for webdataset's split_by_node; OMP_NUM_THREADS=1 in every rank, see run_world);
pairs/s over `--timed` batches after `--warmup`, the ranks' timed windows starting together; the two pipelines run
back to back per configuration, in alternating order. MB read per rank is what went through the
file objects of the rank process and its DataLoader workers while they read epoch 0 (filipctl: fsspec, counted
as benchmarks/loader.py counts it; open_clip: the streams webdataset's url_opener opened), with the number of
shards opened and whether the ranks' shards overlapped. The default set, 4096 pairs in 16 shards, splits evenly
over every configuration (32-pair batches, 1 or 2 ranks, 1 or 2 workers): open_clip sizes an epoch as
ceil(samples / global batch) batches per worker and, where a worker's shards run out before that, starts its shard
list again to fill the last batch; with a 1000-sample shuffle fill that re-reads up to the worker's whole share, which
on a set this small would double its MB per epoch (seen with 1000 pairs in 8 shards), an artefact of the set's size.

--profile runs one rank at world size 1 without loader workers for filipctl, open_clip and filipctl with its
per-sample augmentation seed set through the CPU generator only (`cpu_reseed`, a what-if: jobs/data/loader.py is
not changed), plain twice in turn, then under cProfile, and prints pairs/s and the top functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N1, N2, D = 50, 77, 256
CAPTION_TOKENS = (10, 30)  # real tokens per caption, drawn uniformly: about 20 of 77, like real captions
MB = 1e6
LOSS_ROWS = ("matmul", "matmul, real tokens", "filipctl late", "filipctl loss", "x-clip late", "open_clip CLIP")
WHAT = {
    "matmul": "[B*n1, d] x [d, B*n2], forward only",
    "matmul, real tokens": "[B*n1, d] x [d, real text tokens], forward only",
    "filipctl late": "late_interaction_chunked, both directions, fwd + bwd",
    "filipctl loss": "FilipLoss(interaction='late'), fwd + bwd",
    "x-clip late": "einsum [B, B, n2, n1] + masked max/mean, fwd + bwd",
    "open_clip CLIP": "ClipLoss on pooled [B, d], fwd + bwd",
}
LOADER_CONFIGS = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]  # (world size, loader workers per rank)
PIPELINES = ("filipctl", "open_clip")
# --profile only: filipctl with each sample's augmentation seeded through the CPU generator alone (see cpu_reseed)
RESEEDED = "filipctl-cpu-reseed"


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
                break
    except OSError:
        pass
    versions = {"torch": torch.__version__}
    for name in ("open_clip", "webdataset"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed: the part that needs it says so
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except Exception:
        commit = None
    return {"cpu": cpu, "cpu_flags": flags, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), **versions,
            "python": platform.python_version(), "commit": commit, "load_average": os.getloadavg()[0]}


def describe_machine(m: dict[str, Any]) -> str:
    return (f"{m['cpu']} ({' '.join(m['cpu_flags']) or 'no AVX2'}), {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
            f"open_clip {m['open_clip']}, webdataset {m['webdataset']}, Python {m['python']}, commit {m['commit']}")


# ================================================================================================
# (a) the loss
# ================================================================================================

def loss_inputs(b: int, seed: int = 0) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, N1, D, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b, N2, D, generator=g), dim=-1).requires_grad_()
    xm = torch.ones(b, N1, dtype=torch.bool)
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (b,), generator=g)
    ym = torch.arange(N2)[None, :] < lengths[:, None]
    xp = F.normalize(torch.randn(b, D, generator=g), dim=-1).requires_grad_()
    yp = F.normalize(torch.randn(b, D, generator=g), dim=-1).requires_grad_()
    # A fixed weighting of the score matrices, so that the backward carries a gradient for every pair.
    w_i2t, w_t2i = torch.rand(b, b, generator=g), torch.rand(b, b, generator=g)
    return {"x": x, "y": y, "xm": xm, "ym": ym, "xp": xp, "yp": yp, "w_i2t": w_i2t, "w_t2i": w_t2i,
            "scale": torch.tensor(1 / 0.07).requires_grad_(), "xclip_temperature": torch.tensor(0.0).requires_grad_()}


def xclip_late(image_tokens, text_tokens, text_mask, temperature):
    """FILIP's similarity the way lucidrains/x-clip computes it when `use_all_token_embeds=True`.

    Transcribed (not copied) from x_clip/x_clip.py, `CLIP.forward`, at commit 0c72f6efaf9f748a02b18c1593fc65809164aaf9
    (2023-10-16): one einsum 'm x t d, n y i d -> m n x y t i' of all text tokens with all image tokens, times the
    learned temperature's exp; text->image = max over image tokens (einops reduce 'max'), then `masked_mean` over
    the real text tokens; image->text = the same 4-D tensor with padded text tokens set to -finfo.max
    (`max_neg_value`), max over text tokens, then a plain mean over image tokens (x-clip has no image mask). The
    multiview dimensions m, n (one view each here) are left out. Returns (i2t, t2i), each [B_i, B_t], times
    exp(temperature).
    """
    import torch

    sim = torch.einsum("xtd,yid->xyti", text_tokens, image_tokens) * temperature.exp()  # [B_t, B_i, n2, n1]
    mask = text_mask[:, None, :]  # [B_t, 1, n2]
    t2i = sim.amax(dim=-1).masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1e-6)
    masked = sim.masked_fill(~text_mask[:, None, :, None], -torch.finfo(sim.dtype).max)
    i2t = masked.amax(dim=-2).mean(dim=-1)
    return i2t.t(), t2i.t()


def loss_step(row: str, inp: dict[str, Any]) -> Callable[[], None]:
    """One measurement of `row`: forward (+ backward), gradients dropped after."""
    import torch

    from models.filip import Features
    from models.interaction import late_interaction_chunked
    from models.loss import FilipLoss

    x, y, xm, ym, xp, yp = (inp[k] for k in ("x", "y", "xm", "ym", "xp", "yp"))
    leaves = [x, y, xp, yp, inp["scale"], inp["xclip_temperature"]]

    def backward(loss) -> None:
        loss.backward()
        for t in leaves:
            t.grad = None

    if row == "matmul":
        a, c = x.detach().reshape(-1, D), y.detach().reshape(-1, D).t()
        return lambda: a @ c
    if row == "matmul, real tokens":  # padded text slots left out before the product, as an implementation may
        a, c = x.detach().reshape(-1, D), y.detach()[ym].t().contiguous()
        return lambda: a @ c
    if row == "filipctl late":
        def step() -> None:
            i2t, t2i = late_interaction_chunked(x, y, xm, ym)
            backward((i2t * inp["w_i2t"]).sum() + (t2i * inp["w_t2i"]).sum())
        return step
    if row == "filipctl loss":
        loss_fn = FilipLoss(interaction="late")
        return lambda: backward(loss_fn(Features(x, xm, y, ym, xp, yp), inp["scale"]))
    if row == "x-clip late":
        def step() -> None:
            i2t, t2i = xclip_late(x, y, ym, inp["xclip_temperature"])
            backward((i2t * inp["w_i2t"]).sum() + (t2i * inp["w_t2i"]).sum())
        return step
    if row == "open_clip CLIP":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda: backward(clip_loss(xp, yp, inp["scale"]))
    raise ValueError(f"unknown row {row!r}")


def check_late_rows() -> dict[str, float]:
    """Max abs difference of each late row's forward and gradients against the float64 reference, padded batch."""
    import torch

    from models.interaction import late_interaction, late_interaction_chunked

    inp = loss_inputs(12, seed=1)
    x, y, xm, ym = inp["x"], inp["y"], inp["xm"].clone(), inp["ym"]
    xm[3, 40:] = False  # some image padding too, which x-clip does not model: checked only for filipctl

    def run(fn, xx, yy, mask_x) -> list:
        xx, yy = xx.detach().clone().requires_grad_(), yy.detach().clone().requires_grad_()
        i2t, t2i = fn(xx, yy, mask_x)
        ((i2t * inp["w_i2t"].to(i2t.dtype)).sum() + (t2i * inp["w_t2i"].to(t2i.dtype)).sum()).backward()
        return [i2t.detach().double(), t2i.detach().double(), xx.grad.double(), yy.grad.double()]

    ref = lambda xx, yy, m: late_interaction(xx, yy, m, ym)  # noqa: E731
    out = {}
    want = run(ref, x.double(), y.double(), xm)
    got = run(lambda xx, yy, m: late_interaction_chunked(xx, yy, m, ym), x, y, xm)
    out["filipctl late"] = max((a - b).abs().max().item() for a, b in zip(got, want))
    full = torch.ones_like(xm)
    want = run(ref, x.double(), y.double(), full)
    got = run(lambda xx, yy, m: xclip_late(xx, yy, ym, torch.tensor(0.0)), x, y, full)
    out["x-clip late"] = max((a - b).abs().max().item() for a, b in zip(got, want))
    return out


def loss_times(b: int, repeat: int) -> dict[str, Any]:
    """Every row at batch b in this one process: warm-up round, then `repeat` rounds, median per row."""
    import torch

    inp = loss_inputs(b)
    steps = {row: loss_step(row, inp) for row in LOSS_ROWS}
    times: dict[str, list[float]] = {row: [] for row in LOSS_ROWS}
    for step in steps.values():
        step()
    for _ in range(repeat):
        for row, step in steps.items():  # rows interleaved: a slow spell of the machine hits every row alike
            t0 = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - t0)
    return {"batch": b, "threads": torch.get_num_threads(), "times": times}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def loss_peak(b: int, row: str) -> float:
    """MB of resident-memory growth of one measurement, over the inputs and a warm-up on 2 samples.

    The process's high-water mark is reset first (Linux: "5" to /proc/self/clear_refs), then read as VmHWM, the
    figure ru_maxrss reports: without the reset, the transient peak of importing open_clip and timm (which
    models.loss pulls in) hides every measurement smaller than it. Where the reset is refused, ru_maxrss growth
    as benchmarks/similarity.py takes it."""
    import resource

    small, inp = loss_inputs(2, seed=2), loss_inputs(b)
    loss_step(row, small)()
    step = loss_step(row, inp)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - base) / 1024
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def child(*argv: str, threads: int = 0) -> Any:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    out = subprocess.run([sys.executable, __file__, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_loss(args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    from models.interaction import late_interaction_chunked

    check = child("--loss-check")
    print("exactness against the float64 reference (max abs diff, forward and gradients): "
          + ", ".join(f"{k} {v:.1e}" for k, v in check.items()), file=sys.stderr, flush=True)
    budget = inspect.signature(late_interaction_chunked).parameters["memory_mb"].default
    rows = []
    for b in args.batches:
        timed = child("--loss-time", str(b), "--repeat", str(args.repeat), threads=args.threads)
        floor, best = statistics.median(timed["times"]["matmul"]), min(timed["times"]["matmul"])
        for row in LOSS_ROWS:
            ts = timed["times"][row]
            rows.append({"batch": b, "row": row, "what": WHAT[row], "median_s": statistics.median(ts),
                         "min_s": min(ts), "max_s": max(ts), "vs_matmul": statistics.median(ts) / floor,
                         "min_vs_matmul": min(ts) / best,
                         "peak_mb": child("--loss-peak", str(b), row, threads=args.threads)})
        print(f"loss B={b}: " + ", ".join(f"{r['row']} {r['median_s']:.3f} s ({r['vs_matmul']:.1f}x) "
                                          f"{r['peak_mb']:.0f} MB" for r in rows if r["batch"] == b),
              file=sys.stderr, flush=True)
    return {"n1": N1, "n2": N2, "d": D, "caption_tokens": CAPTION_TOKENS, "repeat": args.repeat,
            "threads": timed["threads"], "late_memory_mb": budget, "exactness": check, "rows": rows}


def loss_table(res: dict[str, Any]) -> str:
    lines = [f"(a) loss, forward + backward, fp32; n1 = {res['n1']} image tokens (all real), n2 = {res['n2']} text "
             f"slots with {res['caption_tokens'][0]}..{res['caption_tokens'][1]} real tokens, d = {res['d']}; median "
             f"of {res['repeat']} after a warm-up, rows interleaved in one process per batch size, "
             f"{res['threads']} torch threads; filipctl's block budget {res['late_memory_mb']:g} MB (its default); "
             f"peak = ru_maxrss growth in a fresh process, inputs excluded.", "",
             "| B | row | computes | median s | x one matmul | min s | x one matmul (min / min) | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['row']} | {r['what']} | {r['median_s']:.4f} | {r['vs_matmul']:.2f} "
                     f"| {r['min_s']:.4f} | {r['min_vs_matmul']:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


# ================================================================================================
# (b) the loader
# ================================================================================================

def loader_bench():
    """benchmarks/loader.py as a module: its data set writer, recipe, sources and fsspec byte counting."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("filipctl_loader_bench", ROOT / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Counting:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.n += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def openclip_pipeline(args: argparse.Namespace, recipe, log_dir: Path | None):
    """open_clip's own training pipeline on the shards, with filipctl's transform and tokenizer -> DataInfo."""
    import functools
    from types import SimpleNamespace

    import open_clip_train.data as OD

    from jobs.data.loader import image_transform
    from models.tokenizer import tokenize

    # webdataset 1.0 ends each shard with an empty EOF sample; open_clip_train 3.3.0 (for webdataset <= 0.2.86)
    # does not expect it. eof_value=None is webdataset's own switch back to the old behaviour.
    OD.tar_file_expander = functools.partial(OD.tar_file_expander, eof_value=None)
    shared: list[Any] = []
    if log_dir is not None:
        real_opener = OD.url_opener

        def url_opener(data, handler=OD.log_and_continue, **kw):
            """Count what goes through every shard stream; logged when the stage is closed (end of an epoch)."""
            opened = []
            try:
                for sample in real_opener(data, handler=handler, **kw):
                    sample["stream"] = Counting(sample["stream"])
                    opened.append((shared[0].get_value(), sample["url"], sample["stream"]))
                    yield sample
            finally:
                with open(log_dir / f"rank{args.rank}.{os.getpid()}.tsv", "a") as log:
                    for epoch, url, stream in opened:
                        log.write(f"{epoch}\t{url}\t{stream.n}\n")

        OD.url_opener = url_opener
    shards = sorted(Path(args.data).glob("*.tar"))
    pattern = f"{args.data}/{{{shards[0].stem}..{shards[-1].stem}}}.tar"  # a brace pattern, as users pass it
    oc_args = SimpleNamespace(train_data=pattern, train_num_samples=args.samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=recipe.train.seed,
                              batch_size=recipe.train.micro_batch_size, world_size=args.world, workers=args.workers)
    context = recipe.model.text.context_length
    info = OD.get_wds_dataset(oc_args, image_transform(recipe.model.image.image_size, recipe.data.augment),
                              is_train=True, epoch=0, tokenizer=lambda text: tokenize([text], context))
    shared.append(info.shared_epoch)
    return info


def cpu_reseed() -> None:
    """What-if for the profile: jobs.data.loader seeds each sample's augmentation with torch.manual_seed, which on a
    CUDA build of torch also queues a lazy seed for CUDA, XPU and MTIA, each formatting the whole Python stack
    (traceback.format_stack, with a stat() per frame) while no device is initialised. The CPU generator's own
    manual_seed seeds the same CPU stream (the augmentations come out bitwise equal) without that."""
    import torch

    import jobs.data.loader as L

    class CpuSeedTorch:
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def manual_seed(seed: int):
            return torch.default_generator.manual_seed(seed)

    L.torch = CpuSeedTorch()


class OpenClipEpochs:
    """open_clip's training loop over its loader: set_epoch, iterate the DataLoader, next epoch."""

    def __init__(self, info) -> None:
        self.info, self.epoch = info, 0
        info.set_epoch(0)
        self.it = iter(info.dataloader)

    def __next__(self):
        while True:
            try:
                return next(self.it)
            except StopIteration:
                self.epoch += 1
                self.info.set_epoch(self.epoch)
                self.it = iter(self.info.dataloader)


def loader_rank(args: argparse.Namespace) -> None:
    """One rank of one pipeline: warm up, wait for the other ranks, time `--timed` batches, read on past epoch 0."""
    import gc

    from jobs.train.batch_layout import layout_for

    lb = loader_bench()
    log_dir = Path(args.log_dir)
    recipe = lb.recipe_of(args, args.workers)
    mb = recipe.train.micro_batch_size
    if args.pipeline == RESEEDED:
        cpu_reseed()
    if args.pipeline in ("filipctl", RESEEDED):
        from jobs.data.loader import TrainBatches

        lb.instrument(log_dir, args.rank)
        batches = TrainBatches(recipe, lb.sources_of(Path(args.data), args.samples, args.per_shard), args.rank,
                               layout_for(mb * args.world, mb, args.world))
    else:
        epochs = OpenClipEpochs(openclip_pipeline(args, recipe, log_dir))
    take = (lambda: next(epochs)) if args.pipeline == "open_clip" else (lambda: next(batches))

    profile = None
    if args.profile_batches:
        import cProfile

        profile = cProfile.Profile()
    for _ in range(args.warmup):
        take()
    (log_dir / f"ready.{args.rank}").touch()
    while len(list(log_dir.glob("ready.*"))) < args.world:
        time.sleep(0.005)
    pairs = 0
    n = args.profile_batches or args.timed
    if profile:
        profile.enable()
    t0 = time.perf_counter()
    for _ in range(n):
        images, ids = take()
        pairs += images.shape[0]
    seconds = time.perf_counter() - t0
    if profile:
        import io
        import pstats

        profile.disable()
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats(key).print_stats(18)
            print(f"---- {args.pipeline}: {n} batches in {seconds:.2f} s, by {key}\n{out.getvalue()}", file=sys.stderr)
        print(json.dumps({"pairs": pairs, "seconds": seconds}))
        return
    shapes = [list(images.shape), list(ids.shape)]
    # Read on until every reader of this rank is past epoch 0, so that its epoch-0 bytes are all logged.
    if args.pipeline != "open_clip":
        readers = batches.schedule.own_readers()
        while not all(r in batches.positions and batches.positions[r].sources[0][0] >= 1 for r in readers):
            next(batches)
    else:
        while epochs.epoch < 1:
            next(epochs)
        for _ in range(max(1, args.workers)):  # every worker has started epoch 1: its epoch-0 stages are closed
            next(epochs)
        gc.collect()
    print(json.dumps({"pairs": pairs, "seconds": seconds, "shapes": shapes}))


def rank_command(args: argparse.Namespace, pipeline: str, rank: int, world: int, workers: int, log_dir: Path,
                 profile_batches: int = 0) -> list[str]:
    return [sys.executable, __file__, "--loader-rank", pipeline, "--rank", str(rank), "--world", str(world),
            "--workers", str(workers), "--log-dir", str(log_dir), "--data", args.data, "--samples",
            str(args.samples), "--per-shard", str(args.per_shard), "--image-size", str(args.image_size),
            "--batch", str(args.batch), "--timed", str(args.timed), "--warmup", str(args.warmup),
            "--profile-batches", str(profile_batches), "--recipe", args.recipe, *[f"--set={s}" for s in args.sets]]


def run_world(args: argparse.Namespace, pipeline: str, world: int, workers: int, log_dir: Path) -> list[dict]:
    log_dir.mkdir(parents=True)
    # One intra-op thread in every rank process, both pipelines, world size 1 too (torchrun sets it at 2 and more):
    # a loader's tensor ops are small (one image), and with 2 threads on a 2-core machine that other processes
    # share, each op can wait a scheduler slice for its second thread; pairs/s at world size 1 then swung 10x
    # between two identical runs, for either pipeline.
    env = {**os.environ, "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(rank_command(args, pipeline, r, world, workers, log_dir), cwd=ROOT,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{pipeline} rank process failed (world {world}, workers {workers}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def prepare_data(args: argparse.Namespace, tmp: Path) -> dict[str, int]:
    lb = loader_bench()
    data = Path(args.data) if args.data else tmp / "train"
    args.data = str(data.resolve())
    t = time.perf_counter()
    if not list(data.glob("*.tar")):
        lb.make_dataset(data, args.samples, args.per_shard, args.image_size)
    size_of = {str(p): p.stat().st_size for p in sorted(data.glob("*.tar"))}
    print(f"{args.samples} samples, {len(size_of)} shards, {sum(size_of.values()) / MB:.1f} MB in {args.data} "
          f"({time.perf_counter() - t:.0f} s to write)", file=sys.stderr, flush=True)
    return size_of


def run_loader(args: argparse.Namespace) -> dict[str, Any]:
    lb = loader_bench()
    tmp = Path(tempfile.mkdtemp(prefix="filip-peers-"))
    size_of = prepare_data(args, tmp)
    total = sum(size_of.values())
    recipe = lb.recipe_of(args, 0)
    runs: dict[tuple[int, int, str], list[list[dict]]] = {}
    for rnd in range(args.rounds):
        for i, (world, workers) in enumerate(tuple(map(int, c.split(":"))) for c in args.configs):
            order = PIPELINES if (i + rnd) % 2 == 0 else PIPELINES[::-1]
            for pipeline in order:
                log_dir = tmp / f"r{rnd}-w{world}-k{workers}-{pipeline}"
                results = run_world(args, pipeline, world, workers, log_dir)
                for rank, res in enumerate(results):
                    urls, read = lb.measured_epoch0(log_dir, rank)
                    urls = sorted(urls)
                    res.update(rate=res["pairs"] / res["seconds"], shards=urls, mb_read=read / MB,
                               mb_of_shards=sum(size_of[u] for u in urls) / MB)
                runs.setdefault((world, workers, pipeline), []).append(results)
                print(f"round {rnd}, world {world}, workers {workers}, {pipeline}: " + ", ".join(
                    f"rank {r}: {res['rate']:.0f} pairs/s, {res['mb_read']:.2f} MB read in epoch 0 "
                    f"({len(res['shards'])} shards)" for r, res in enumerate(results)), file=sys.stderr, flush=True)
    rows = []
    for (world, workers, pipeline), rounds in runs.items():
        per_rank = [[rnd[r] for rnd in rounds] for r in range(world)]
        shard_sets = [set(rounds[0][r]["shards"]) for r in range(world)]
        overlap = any(shard_sets[a] & shard_sets[b] for a in range(world) for b in range(a + 1, world))
        rows.append({"world": world, "workers": workers, "pipeline": pipeline,
                     "pairs_per_s": [statistics.median(x["rate"] for x in rr) for rr in per_rank],
                     "all_rates": [[x["rate"] for x in rr] for rr in per_rank],
                     "mb_read": [rr[0]["mb_read"] for rr in per_rank],
                     "mb_of_shards": [rr[0]["mb_of_shards"] for rr in per_rank],
                     "shards": [len(s) for s in shard_sets], "overlap": overlap,
                     "shapes": rounds[0][0]["shapes"]})
    rows.sort(key=lambda r: (r["world"], r["workers"], PIPELINES.index(r["pipeline"])))
    for r in rows:
        peer = next(o for o in rows if (o["world"], o["workers"], o["pipeline"]) == (r["world"], r["workers"],
                                                                                     "open_clip"))
        r["vs_open_clip"] = statistics.mean(r["pairs_per_s"]) / statistics.mean(peer["pairs_per_s"])
    return {"samples": args.samples, "shards": len(size_of), "mb_on_disk": total / MB, "image_size": args.image_size,
            "batch": args.batch, "augment": recipe.data.augment, "filipctl_shuffle_buffer": recipe.data.shuffle_buffer,
            "context_length": recipe.model.text.context_length, "timed": args.timed, "warmup": args.warmup,
            "rounds": args.rounds, "rows": rows}


def loader_table(res: dict[str, Any]) -> str:
    def per_rank(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    lines = [f"(b) loader: {res['samples']} pairs of {res['image_size']} px JPEGs in {res['shards']} shards "
             f"({res['mb_on_disk']:.1f} MB), micro-batch {res['batch']}, image transform and tokenizer filipctl's "
             f"(resize to {res['image_size']}, AutoAugment {'on' if res['augment'] else 'off'}, context "
             f"{res['context_length']}) in both; shuffle: filipctl {res['filipctl_shuffle_buffer']} per reader, "
             f"open_clip 5000 (1000 before the first sample); {res['timed']} timed batches per rank after "
             f"{res['warmup']}, median of {res['rounds']} round(s); OMP_NUM_THREADS=1 in every rank; per-rank values "
             "rank 0 / rank 1.", "",
             "| world size | loader workers | pipeline | pairs/s per rank | pairs/s all ranks | vs open_clip "
             "| MB read per rank, epoch 0 | share of the set per rank | shards per rank (overlap) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        share = per_rank([m / res["mb_on_disk"] for m in r["mb_read"]], ".0%")
        lines.append(f"| {r['world']} | {r['workers']} | {r['pipeline']} | {per_rank(r['pairs_per_s'], '.0f')} "
                     f"| {sum(r['pairs_per_s']):.0f} | {r['vs_open_clip']:.2f}x | {per_rank(r['mb_read'], '.2f')} "
                     f"| {share} | {per_rank(r['shards'], 'd')} ({'yes' if r['overlap'] else 'no'}) |")
    return "\n".join(lines)


def run_profile(args: argparse.Namespace) -> None:
    """One rank at world size 1 reading in its own process (no loader workers): filipctl, open_clip and filipctl with
    the CPU-only reseed (cpu_reseed), timed plainly twice in turn (ABCABC), then once each under cProfile."""
    tmp = Path(tempfile.mkdtemp(prefix="filip-peers-profile-"))
    prepare_data(args, tmp)
    args.world, args.workers, args.timed = 1, 0, args.profile_batches
    variants = (*PIPELINES, RESEEDED)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for turn in range(3):
        for pipeline in variants:
            log_dir = tmp / f"{pipeline}-{turn}"
            log_dir.mkdir()
            profiled = turn == 2
            out = subprocess.run(rank_command(args, pipeline, 0, 1, 0, log_dir, args.profile_batches if profiled else 0),
                                 cwd=ROOT, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"},
                                 capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(f"{pipeline} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if profiled:
                print(out.stderr, file=sys.stderr)
                print(f"{pipeline}: {res['pairs'] / res['seconds']:.0f} pairs/s under cProfile", flush=True)
            else:
                rates[pipeline].append(res["pairs"] / res["seconds"])
    for pipeline in variants:
        print(f"{pipeline}: " + ", ".join(f"{r:.0f}" for r in rates[pipeline]) + " pairs/s without the profiler "
              f"({args.profile_batches} batches after {args.warmup}, OMP_NUM_THREADS=1)", flush=True)


# ================================================================================================

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["loss", "loader"])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256], help="(a) batch sizes")
    ap.add_argument("--repeat", type=int, default=5, help="(a) timed rounds per batch size")
    ap.add_argument("--threads", type=int, default=0,
                    help="(a) OMP_NUM_THREADS of the measuring processes (default: torch's own, all cores); 1 is what "
                         "each of 2 workers runs with on this machine, and stalls less when other work shares the cores")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="(b) micro-batch per rank")
    ap.add_argument("--timed", type=int, default=100, help="(b) timed batches per rank")
    ap.add_argument("--warmup", type=int, default=10, help="(b) batches per rank before the timed window")
    ap.add_argument("--rounds", type=int, default=3, help="(b) repeats of the whole sweep; the median is shown")
    ap.add_argument("--configs", nargs="+", default=[f"{w}:{k}" for w, k in LOADER_CONFIGS], metavar="WORLD:WORKERS",
                    help="(b) the (world size, loader workers) pairs to run")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/smoke.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=["data.augment=true"], metavar="KEY=VALUE",
                    help="recipe overrides for (b) (data.augment=true is set first, as in benchmarks/loader.py)")
    ap.add_argument("--data", default=None, help="(b) shard folder (written unless it holds *.tar)")
    ap.add_argument("--profile", action="store_true", help="(b) profile both pipelines instead of the sweep")
    ap.add_argument("--profile-batches", type=int, default=60)
    # internal: one measurement in a process of its own
    ap.add_argument("--loss-check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss-time", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--loss-peak", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--loader-rank", choices=(*PIPELINES, RESEEDED), help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.loss_check:
        print(json.dumps(check_late_rows()))
        return
    if args.loss_time is not None:
        print(json.dumps(loss_times(args.loss_time, args.repeat)))
        return
    if args.loss_peak:
        print(json.dumps(loss_peak(int(args.loss_peak[0]), args.loss_peak[1])))
        return
    if args.loader_rank:
        args.pipeline = args.loader_rank
        if not args.profile_batches or args.profile_batches < 0:
            args.profile_batches = 0
        loader_rank(args)
        return
    if args.profile:
        run_profile(args)
        return

    started = time.time()
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if args.only in (None, "loss"):
        result["loss"] = run_loss(args)
    if args.only in (None, "loader"):
        result["loader"] = run_loader(args)
    result["load_average_end"] = os.getloadavg()[0]
    result["wall_s"] = time.time() - started
    m = result["machine"]
    tables = [f"Machine: {describe_machine(m)}; load average {m['load_average']:.1f} at the start, "
              f"{result['load_average_end']:.1f} at the end; {result['wall_s'] / 60:.1f} min; "
              f"`{result['command']}`."]
    tables += [loss_table(result["loss"])] if "loss" in result else []
    tables += [loader_table(result["loader"])] if "loader" in result else []
    if args.json:  # the tables still go to stderr, so that one run gives both
        print(json.dumps(result, indent=1))
        print("\n\n".join(tables), file=sys.stderr)
        return
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
