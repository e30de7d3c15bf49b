"""Training data loader: pairs/s per rank and MB read per rank per epoch, world size 1 and 2, loader workers 0/1/2.

    .venv/bin/python benchmarks/loader.py [--samples 4000] [--per-shard 250] [--batches 100] [--warmup 10]
                                          [--recipe recipes/smoke.yaml] [--set key=value ...] [--data DIR]

Writes a synthetic set in img2dataset's layout (jobs.data.synthetic.make_sample images at 224 px,
jobs.data.shards.ShardWriter), then for every (world size, loader workers) runs each rank as its own
process, all ranks at once so that they compete for the cores as real ranks do (no process group:
jobs.data.loader.TrainBatches takes the rank and world size as arguments). Each rank times `--batches`
batches of `TrainBatches` after `--warmup` batches (worker start, shuffle buffer fill), the ranks'
timed windows starting together, and reports pairs/s.

MB read per rank per epoch is given twice:
  planned   the on-disk bytes of the shards `jobs.data.loader.epoch_samples` assigns to the rank's readers
            in epoch 0, got by running the real epoch_samples with iter_samples stubbed out;
  measured  the bytes that went through fsspec's file objects in the rank process and its DataLoader
            workers while they read epoch 0 (each rank keeps drawing after its timed window until all
            of its readers have moved on to epoch 1).
Before the loader split shards across ranks, every rank read every shard: MB per rank = whole set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.train.batch_layout import layout_for  # noqa: E402 (after the path)

CONFIGS = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]  # (world size, loader workers per rank)
MB = 1e6


def make_dataset(out: Path, samples: int, per_shard: int, image_size: int) -> list[str]:
    from jobs.data.shards import ShardWriter
    from jobs.data.synthetic import make_sample

    with ShardWriter(str(out), per_shard) as sink:
        for i in range(samples):
            image, caption, meta = make_sample(0, "train", i, image_size, 3)
            sink.write({"jpg": image, "txt": caption, "json": {"key": "", **meta}})
    return sink.shards


def recipe_of(args: argparse.Namespace, workers: int):
    from filipctl.recipes import load_recipe

    return load_recipe(args.recipe, [f"data.train={args.data}", "data.synthetic=null", "data.augment=true",
                                     f"model.image.image_size={args.image_size}", f"train.micro_batch_size={args.batch}",
                                     f"data.loader_workers={workers}", *args.sets])


def sources_of(data: Path, samples: int, per_shard: int):
    from jobs.data.loader import ShardSource

    shards = sorted(str(p) for p in data.glob("*.tar"))
    counts = [min(per_shard, samples - i * per_shard) for i in range(len(shards))]
    return [ShardSource(str(data), 1.0, tuple(shards), tuple(counts))]


def planned_shards(recipe, sources, rank: int, world: int, epoch: int = 0) -> list[str]:
    """The shards the real `epoch_samples` hands this rank's readers in `epoch` (nothing is read)."""
    import jobs.data.loader as L

    mb = recipe.train.micro_batch_size
    schedule = L.ReaderSchedule(layout_for(mb * world, mb, world), max(1, recipe.data.loader_workers), rank, 0)
    plan = L.ReaderPlan(tuple(sources), schedule.readers, recipe.train.seed, recipe.data.shuffle_buffer)
    opened: list[str] = []

    def stub(urls, on_error):
        opened.extend(urls)
        return iter(())

    real, L.iter_samples = L.iter_samples, stub
    try:
        for reader in schedule.own_readers():
            for _ in L.epoch_samples(plan, 0, epoch, reader, L.Problems()):
                pass
    finally:
        L.iter_samples = real
    return opened


# ---- one rank (a process of its own) ----------------------------------------------------------

def instrument(log_dir: Path, rank: int) -> None:
    """Log, per process (DataLoader workers inherit this through fork), every shard opened with the
    epoch it was opened in and the bytes read from it."""
    import fsspec

    import jobs.data.loader as L
    import jobs.data.shards as S

    epoch = [0]
    real_epoch_samples = L.epoch_samples

    def epoch_samples(plan, src, ep, reader, problems):
        epoch[0] = ep  # one reader per process, and an epoch's shards are all opened before the next epoch's
        return real_epoch_samples(plan, src, ep, reader, problems)

    class Counting:
        def __init__(self, f: Any) -> None:
            self.f, self.n = f, 0

        def read(self, size: int = -1) -> bytes:
            data = self.f.read(size)
            self.n += len(data)
            return data

    class Opened:
        def __init__(self, url: str, mode: str, **kw: Any) -> None:
            self.url, self.of = url, fsspec.open(url, mode, **kw)

        def __enter__(self) -> Counting:
            self.file = Counting(self.of.__enter__())
            return self.file

        def __exit__(self, *exc: Any) -> Any:
            with open(log_dir / f"rank{rank}.{os.getpid()}.tsv", "a") as log:
                log.write(f"{epoch[0]}\t{self.url}\t{self.file.n}\n")
            return self.of.__exit__(*exc)

    class FsspecShim:
        def __getattr__(self, name: str) -> Any:
            return getattr(fsspec, name)

        open = staticmethod(Opened)

    L.epoch_samples = epoch_samples
    S.fsspec = FsspecShim()


def run_rank(args: argparse.Namespace) -> None:
    from jobs.data.loader import TrainBatches

    log_dir = Path(args.log_dir)
    instrument(log_dir, args.rank)
    recipe = recipe_of(args, args.workers)
    sources = sources_of(Path(args.data), args.samples, args.per_shard)
    mb = recipe.train.micro_batch_size
    batches = TrainBatches(recipe, sources, args.rank, layout_for(mb * args.world, mb, args.world))
    for _ in range(args.warmup):
        next(batches)
    (log_dir / f"ready.{args.rank}").touch()  # start the timed windows of all ranks together
    while len(list(log_dir.glob("ready.*"))) < args.world:
        time.sleep(0.005)
    pairs = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        images, ids = next(batches)
        pairs += images.shape[0]
    seconds = time.perf_counter() - t0
    assert images.shape[-1] == recipe.model.image.image_size
    # Go on until every reader of this rank has drawn from epoch 1: its epoch-0 shards are all read and logged.
    readers = batches.schedule.own_readers()
    extra = 0
    while not all(r in batches.positions and batches.positions[r].sources[0][0] >= 1 for r in readers):
        next(batches)
        extra += 1
    print(json.dumps({"pairs": pairs, "seconds": seconds, "extra_batches": extra}))


# ---- the driver --------------------------------------------------------------------------------

def measured_epoch0(log_dir: Path, rank: int) -> tuple[set[str], int]:
    urls: set[str] = set()
    total = 0
    for path in log_dir.glob(f"rank{rank}.*.tsv"):
        for line in path.read_text().splitlines():
            epoch, url, n = line.split("\t")
            if epoch == "0":
                urls.add(url)
                total += int(n)
    return urls, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=100, help="timed batches per rank")
    ap.add_argument("--warmup", type=int, default=10, help="batches per rank before the timed window")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/smoke.yaml"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default=None, help="shard folder (written unless it holds *.tar); default: a temp dir")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        run_rank(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="filip-loader-"))
    data = Path(args.data) if args.data else tmp / "train"
    args.data = str(data.resolve())
    t = time.perf_counter()
    if not list(data.glob("*.tar")):
        make_dataset(data, args.samples, args.per_shard, args.image_size)
    sources = sources_of(data, args.samples, args.per_shard)
    size_of = {url: os.path.getsize(url) for url in sources[0].shards}
    total_mb = sum(size_of.values()) / MB
    print(f"{args.samples} samples, {len(size_of)} shards, {total_mb:.1f} MB "
          f"({time.perf_counter() - t:.0f} s to write)", file=sys.stderr, flush=True)

    rows = []
    for world, workers in CONFIGS:
        recipe = recipe_of(args, workers)
        log_dir = tmp / f"log-w{world}-k{workers}"
        log_dir.mkdir()
        # torchrun sets OMP_NUM_THREADS=1 when it starts several processes on a node.
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if world > 1 else {})}
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world),
                                   "--workers", str(workers), "--log-dir", str(log_dir), "--data", args.data,
                                   "--samples", str(args.samples), "--per-shard", str(args.per_shard),
                                   "--image-size", str(args.image_size), "--batch", str(args.batch),
                                   "--batches", str(args.batches), "--warmup", str(args.warmup),
                                   "--recipe", args.recipe, *[f"--set={s}" for s in args.sets]],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
                 for r in range(world)]
        results = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"rank process failed (world {world}, workers {workers})")
            results.append(json.loads(out.strip().splitlines()[-1]))
        rates, planned, measured = [], [], []
        for rank, res in enumerate(results):
            plan = planned_shards(recipe, sources, rank, world)
            urls, read = measured_epoch0(log_dir, rank)
            if sorted(urls) != sorted(set(plan)):
                raise SystemExit(f"world {world}, workers {workers}, rank {rank}: opened {sorted(urls)} in epoch 0, "
                                 f"planned {sorted(plan)}")
            rates.append(res["pairs"] / res["seconds"])
            planned.append(sum(size_of[u] for u in plan) / MB)
            measured.append(read / MB)
        rows.append((world, workers, world * max(1, workers), rates, planned, measured))
        print(f"world {world}, loader workers {workers}: " + ", ".join(
            f"rank {r}: {rate:.0f} pairs/s, {p:.2f} MB planned, {m:.2f} MB measured"
            for r, (rate, p, m) in enumerate(zip(rates, planned, measured))), file=sys.stderr, flush=True)

    def per_rank(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    print(f"\n{args.samples} pairs of {args.image_size} px JPEGs in {len(size_of)} shards, {total_mb:.1f} MB on disk; "
          f"batch {args.batch}, AutoAugment on, shuffle buffer {recipe.data.shuffle_buffer}; "
          f"{args.batches} timed batches per rank after {args.warmup}. "
          f"Per-rank values are rank 0 / rank 1. Old design: every rank read all {total_mb:.1f} MB per epoch.\n")
    print("| world size | loader workers | readers | pairs/s per rank | pairs/s all ranks "
          "| MB read per rank per epoch (planned) | (measured) | vs old design |")
    print("|---|---|---|---|---|---|---|---|")
    for world, workers, readers, rates, planned, measured in rows:
        print(f"| {world} | {workers} | {readers} | {per_rank(rates, '.0f')} | {sum(rates):.0f} "
              f"| {per_rank(planned, '.2f')} | {per_rank(measured, '.2f')} "
              f"| {sum(planned) / len(planned) / total_mb:.0%} |")


if __name__ == "__main__":
    main()
