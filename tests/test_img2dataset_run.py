"""A new user's first run on their own data: shards as img2dataset writes them, one of them damaged.

The shards are written here with plain `tarfile` (not filipctl's ShardWriter), so the test checks
the img2dataset layout independently of the product's own writer: `{shard:05d}.tar` holding
KEY.jpg / KEY.txt / KEY.json, with `{shard:05d}_stats.json` and `{shard:05d}.parquet` beside it,
failed samples counted in the stats and the parquet but absent from the tar. Each sample is built
to pass or to fail exactly one of the paper's filters, so every count the product reports is
known here in advance.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 170), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
BACKGROUNDS = {"gray": (128, 128, 128), "brown": (120, 70, 30), "pink": (250, 170, 200), "teal": (0, 128, 128),
               "navy": (0, 0, 90)}
SHAPES = ["square", "circle", "triangle", "diamond"]  # the held-out split's classnames.txt, in this order

ATTEMPTS_PER_SHARD = 100  # samples img2dataset tried per shard (its samples_per_shard)
TRAIN_SHARDS = 4  # intact training shards; one more (00004) is damaged
# Index within a shard -> what img2dataset made of that sample, or which filter rule it is built to fail.
FAILED = {7: "failed_to_download", 32: "failed_to_download", 57: "failed_to_download", 82: "failed_to_resize"}
DROPS = {10: "min_side", 60: "min_side", 20: "aspect", 30: "meaningless", 70: "meaningless",
         40: "language", 90: "language", 45: "repeated", 65: "repeated", 85: "repeated"}
MEANINGLESS = {30: "IMG_1234.jpg", 70: "DSC00012"}
FOREIGN = {40: "ein rotes Quadrat auf einem grauen Hintergrund", 90: "un carré rouge sur un fond gris"}
SPAM = "click here to see more photos"  # 3 per shard: more than filter.max_repeats (10) in all
SUCCESSES = ATTEMPTS_PER_SHARD - len(FAILED)  # 96 per shard


@dataclass
class Sample:
    key: str
    caption: str
    status: str  # "success" or img2dataset's failure
    jpg: bytes = b""
    meta: dict | None = None
    rule: str | None = None  # the filter rule it is built to fail (None: kept)


def _draw(rng: random.Random, colour: str, shape: str, background: str) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), BACKGROUNDS[background])
    d = ImageDraw.Draw(im)
    r = rng.randint(10, 16)
    cx, cy = rng.randint(r + 2, 61 - r), rng.randint(r + 2, 61 - r)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_shard(shard: int, attempts: int, rng: random.Random, *, held_out: bool) -> list[Sample]:
    """What img2dataset would have produced for one shard: every attempted sample, failed ones included."""
    samples = []
    for i in range(attempts):
        key = f"{shard:05d}{i:04d}"  # shard id + index zero-padded to the digits of samples_per_shard - 1
        n = shard * attempts + i
        colour = list(COLOURS)[n % len(COLOURS)]
        shape = SHAPES[(n // len(COLOURS)) % len(SHAPES)]
        background = list(BACKGROUNDS)[(n // (len(COLOURS) * len(SHAPES))) % len(BACKGROUNDS)]
        caption = f"a {colour} {shape} on a {background} background"
        url = f"https://images.example.com/{shard}/{i}-{colour}-{shape}.jpg"
        if not held_out and i in FAILED:
            samples.append(Sample(key, caption, FAILED[i], meta={
                "url": url, "caption": caption, "key": key, "status": FAILED[i],
                "error_message": "HTTP Error 404: Not Found" if FAILED[i] == "failed_to_download"
                else "image decoding error", "width": None, "height": None, "original_width": None,
                "original_height": None, "exif": None, "sha256": None}))
            continue
        rule = None if held_out else DROPS.get(i)
        side = rng.randint(200, 640)
        original = (side, side * rng.randint(3, 5) // 4)  # aspect <= 1.67
        if rule == "min_side":
            original = (24, 30)
        elif rule == "aspect":
            original = (480, 120)
        elif rule == "meaningless":
            caption = MEANINGLESS[i]
        elif rule == "language":
            caption = FOREIGN[i]
        elif rule == "repeated":
            caption = SPAM
        jpg = _draw(rng, colour, shape, background)
        meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                "width": 64, "height": 64, "original_width": original[0], "original_height": original[1],
                "exif": json.dumps({"Image Make": "Canon", "Image Model": "EOS 5D"}),
                "sha256": hashlib.sha256(jpg).hexdigest()}
        if held_out:
            meta["label"] = SHAPES.index(shape)
        samples.append(Sample(key, caption, "success", jpg, meta, rule))
    return samples


def _write_shard(folder: Path, shard: int, samples: list[Sample]) -> dict[str, tuple[int, int]]:
    """`{shard:05d}.tar` + `_stats.json` + `.parquet`, img2dataset style -> {member: (data offset, size)}."""
    ok = [s for s in samples if s.status == "success"]
    with tarfile.open(folder / f"{shard:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for s in ok:
            for ext, data in (("jpg", s.jpg), ("json", json.dumps(s.meta, indent=4).encode()),
                              ("txt", s.caption.encode())):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(folder / f"{shard:05d}.tar") as tar:  # where each member's data lies, to damage one
        offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    status_dict: dict[str, int] = {}
    for s in samples:
        reason = "success" if s.status == "success" else s.meta["error_message"]
        status_dict[reason] = status_dict.get(reason, 0) + 1
    stats = {"count": len(samples), "successes": len(ok),
             "failed_to_download": sum(s.status == "failed_to_download" for s in samples),
             "failed_to_resize": sum(s.status == "failed_to_resize" for s in samples),
             "duration": 12.3, "start_time": 1700000000.0, "end_time": 1700000012.3, "status_dict": status_dict}
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the parquet is for the user's bookkeeping; filipctl does not read it
        return offsets
    columns = ["url", "caption", "key", "status", "error_message", "width", "height", "original_width",
               "original_height", "exif", "sha256"]
    pq.write_table(pa.table({c: [s.meta[c] for s in samples] for c in columns}), folder / f"{shard:05d}.parquet")
    return offsets


@dataclass
class UserData:
    train: Path
    eval: Path
    kept_samples: list[Sample]  # what the readable part of the input holds (the damaged shard's first part included)
    damaged_readable: int  # samples of 00004.tar before the damage


def make_user_data(root: Path) -> UserData:
    rng = random.Random(0)
    train, held_out = root / "cc-mini", root / "cc-mini-eval"
    train.mkdir(parents=True)
    held_out.mkdir(parents=True)
    readable: list[Sample] = []
    for shard in range(TRAIN_SHARDS):
        samples = _make_shard(shard, ATTEMPTS_PER_SHARD, rng, held_out=False)
        _write_shard(train, shard, samples)
        readable += [s for s in samples if s.status == "success"]
    # A fifth shard, downloaded fine (its stats say so) but cut in the middle of a copy: the tar ends
    # half-way through one sample's image. Everything before that sample is readable, nothing after.
    damaged = _make_shard(TRAIN_SHARDS, ATTEMPTS_PER_SHARD, rng, held_out=False)
    offsets = _write_shard(train, TRAIN_SHARDS, damaged)
    ok = [s for s in damaged if s.status == "success"]
    cut_at = len(ok) // 2
    start, size = offsets[f"{ok[cut_at].key}.jpg"]
    path = train / f"{TRAIN_SHARDS:05d}.tar"
    path.write_bytes(path.read_bytes()[: start + size // 2])
    readable += ok[:cut_at]
    # The held-out split: 2 shards of 50 with a class label per sample and classnames.txt beside them.
    for shard in range(2):
        _write_shard(held_out, shard, _make_shard(shard, 50, rng, held_out=True))
    (held_out / "classnames.txt").write_text("".join(f"{name}\n" for name in SHAPES))
    return UserData(train, held_out, readable, cut_at)


def _listing(*folders: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for f in folders for p in sorted(f.rglob("*"))}


def _pipeline_stages(client, exp_id: str) -> tuple[object, dict[str, object]]:
    """The newest pipeline run and its stage runs by stage name."""
    parent = client.search_runs([exp_id], "tags.`filipctl.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.data.tags["filipctl.stage"]: c for c in children}


@pytest.mark.slow
def test_img2dataset_shards_with_a_damaged_one_filtered_then_raw(tmp_path: Path, smoke_overrides: list[str]) -> None:
    from mlflow.tracking import MlflowClient

    data = make_user_data(tmp_path / "data")
    before = _listing(data.train, data.eval)
    shard_names = [f"{i:05d}.tar" for i in range(TRAIN_SHARDS + 1)]
    assert sorted(p.name for p in data.train.glob("*.tar")) == shard_names
    brace = f"{data.train}/{{00000..{TRAIN_SHARDS:05d}}}.tar"
    user = [*smoke_overrides, "--set", "data.synthetic=null", "--set", f"data.train={brace}",
            "--set", f"data.eval={data.eval}", "--set", "data.max_bad_fraction=0.5",
            "--set", "data.loader_workers=1"]
    filtered_dir = tmp_path / "filtered"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    # What the filters must make of the input, known from how each sample was built.
    expected_dropped = {rule: sum(s.rule == rule for s in data.kept_samples)
                        for rule in ("min_side", "aspect", "meaningless", "language", "repeated")}
    expected_input = len(data.kept_samples)
    expected_kept = expected_input - sum(expected_dropped.values())
    assert expected_input == TRAIN_SHARDS * SUCCESSES + data.damaged_readable
    assert expected_dropped["repeated"] > 10 and expected_kept > 0.85 * expected_input  # keeps most

    # ---- 1. With the paper's filters (min_side lowered for 64-px thumbnails): filtered shards are trained on.
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *user,
                  "--set", f"data.filter={{output: {filtered_dir}, min_side: 32, samples_per_shard: 150}}",
                  "--set", f"output_dir={tmp_path / 'runs-filtered'}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    # The user's folders are only read: nothing written beside the shards, no manifest asked for.
    assert _listing(data.train, data.eval) == before
    assert not [p for p in tmp_path.rglob("manifest*") if "checkpoints" not in p.parts]  # (a checkpoint's own list)
    assert not list(tmp_path.rglob("dataset.json"))

    report = json.loads((filtered_dir / "source0" / "filter_report.json").read_text())
    assert report["inputs"] == [str(data.train / n) for n in shard_names]
    assert report["input"] == expected_input
    assert report["dropped"] == expected_dropped
    assert report["kept"] == expected_kept
    # The damaged shard is named once; the sample cut in half is neither input nor dropped.
    assert report["unreadable"] == 1
    assert len(report["errors"]) == 1 and f"{data.train}/00004.tar" in report["errors"][0]

    (data_dir,) = (tmp_path / "runs-filtered").glob("stages/data-*")
    (run_dir,) = (tmp_path / "runs-filtered").glob("stages/pretrain-*")
    index = json.loads((data_dir / "data.json").read_text())
    (source,) = index["train"]
    n_out = -(-expected_kept // 150)
    assert source["url"] == str(filtered_dir / "source0")
    assert source["shards"] == [str(filtered_dir / "source0" / f"{i:05d}.tar") for i in range(n_out)]
    assert source["counts"] == [150] * (n_out - 1) + [expected_kept - 150 * (n_out - 1)]
    assert index["eval"]["shards"] == [str(data.eval / "00000.tar"), str(data.eval / "00001.tar")]
    assert index["eval"]["counts"] == [50, 50] and index["eval"]["classnames"] == SHAPES

    exp = client.get_experiment_by_name("filip")
    parent, stages = _pipeline_stages(client, exp.experiment_id)
    assert parent.info.status == "FINISHED" and set(stages) == {"data", "pretrain", "eval"}
    assert all(c.info.status == "FINISHED" for c in stages.values())
    dm = stages["data"].data.metrics
    assert dm["filter_source0_input"] == expected_input and dm["filter_source0_kept"] == expected_kept
    assert {k: dm[f"filter_source0_dropped_{k}"] for k in expected_dropped} == expected_dropped
    assert dm["train_pairs"] == expected_kept and dm["train_shards"] == n_out
    assert dm["eval_pairs"] == 100 and dm["classes"] == len(SHAPES)
    pre = stages["pretrain"].info.run_id
    assert [m.step for m in client.get_metric_history(pre, "loss")] == [5, 10, 15, 20]
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["steps_run"] == 20
    # The filter left the damage behind: training reads clean shards.
    assert [m.value for m in client.get_metric_history(pre, "skipped_samples")] == [0.0] * 4
    ev = stages["eval"].data.metrics
    assert 0.0 <= ev["zeroshot_top1"] <= 1.0 and 0.0 <= ev["i2t_R1"] <= 1.0

    # ---- 2. The same shards without a filter: the damaged shard reaches the loader, which skips what
    # it lost, counts it and names the shard, and the run goes on.
    res = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *user,
                  "--set", f"output_dir={tmp_path / 'runs-raw'}", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _listing(data.train, data.eval) == before

    (data_dir,) = (tmp_path / "runs-raw").glob("stages/data-*")
    (run_dir,) = (tmp_path / "runs-raw").glob("stages/pretrain-*")
    index = json.loads((data_dir / "data.json").read_text())
    (source,) = index["train"]
    assert source["url"] == brace and source["weight"] == 1.0
    assert source["shards"] == [str(data.train / n) for n in shard_names]
    # Counts are the stats files' successes, the damaged shard's included (its stats predate the damage).
    assert source["counts"] == [SUCCESSES] * (TRAIN_SHARDS + 1)

    parent, stages = _pipeline_stages(client, exp.experiment_id)
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in stages.values())
    dm = stages["data"].data.metrics
    assert dm["train_pairs"] == SUCCESSES * (TRAIN_SHARDS + 1) and dm["train_shards"] == TRAIN_SHARDS + 1
    assert not any(k.startswith("filter_") for k in dm)
    pre = stages["pretrain"].info.run_id
    assert [m.step for m in client.get_metric_history(pre, "loss")] == [5, 10, 15, 20]
    lost = SUCCESSES - data.damaged_readable
    skipped = [int(m.value) for m in client.get_metric_history(pre, "skipped_samples")]
    assert skipped[-1] > 0 and all(v % lost == 0 for v in skipped), (skipped, lost)  # lost once per epoch read
    assert stages["pretrain"].data.metrics["skipped_samples"] > 0
    log = (run_dir / "logs" / "pretrain.log").read_text()
    named = [line for line in log.splitlines() if "skipped" in line and f"{data.train}/00004.tar" in line]
    assert named, log[-3000:]
    assert f"({lost} of {SUCCESSES} samples lost)" in named[0], named[0]
    ev = stages["eval"].data.metrics
    assert 0.0 <= ev["zeroshot_top1"] <= 1.0 and 0.0 <= ev["i2t_R1"] <= 1.0
