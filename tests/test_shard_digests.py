"""A shard changed after the data stage indexed it is checked against its recorded digest before its first sample
is read: named, skipped whole and counted like a damaged shard; past data.max_bad_fraction the run fails with one
line. Real shards, real tar rewrites, a real S3 (moto) for the ETag check, and the real CLI and torchrun."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import jobs.data.shards as shards_mod
from jobs.data.index import shard_digests
from jobs.data.loader import Problems, ReaderPlan, ShardSource, TrainBatches, epoch_samples
from jobs.data.shards import DigestCheck
from tests.conftest import FILIPCTL, ROOT, run_cli
from jobs.train.batch_layout import layout_for
from tests.test_loader import _recipe, write_source


def retar_with_one_caption_altered(shard: Path) -> None:
    """Rewrite the shard with the first caption's bytes changed and its length, so its size, kept: a change only
    a digest sees (the control side's size check would not)."""
    src = tarfile.open(shard)
    members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    src.close()
    size = shard.stat().st_size
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        altered = False
        for info, data in members:
            if info.name.endswith(".txt") and not altered:
                data, altered = data.upper()[:-1] + b"!", True
                assert len(data) == info.size
            tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(out.getvalue())
    assert altered and shard.stat().st_size == size


def with_digests(source: ShardSource) -> ShardSource:
    return ShardSource(source.url, source.weight, source.shards, source.counts, tuple(shard_digests(list(source.shards))))


def test_changed_shard_is_skipped_whole_named_and_counted(tmp_path: Path) -> None:
    source = with_digests(write_source(tmp_path / "a", 40, 10, "a"))
    plan = ReaderPlan((source,), 1, 0, 0)
    problems = Problems()
    assert len(list(epoch_samples(plan, 0, 0, 0, problems))) == 40 and problems.take() == ([], 0, 0)

    changed = Path(source.shards[2])
    retar_with_one_caption_altered(changed)
    keys = [s["__key__"] for s in epoch_samples(plan, 0, 0, 0, problems)]
    # none of its samples was handed out, the altered one included: the check comes before reading
    assert len(keys) == 30 and not any(k.startswith("00002") for k in keys)
    messages, skipped, lost = problems.take()
    assert skipped == lost == 10 and len(messages) == 1, messages
    assert messages[0].startswith(f"shard {changed} changed since the data stage indexed it (sha256 ")
    assert "!=" in messages[0] and ": skipped" in messages[0]

    # through the whole loader with 2 worker processes: batches keep coming, the skip is counted and named
    batches = TrainBatches(_recipe(tmp_path, "data.augment=false", "data.loader_workers=2"), [source], 0,
                           layout_for(4, 4, 1))
    for _ in range(12):
        next(batches)
    assert batches.skipped >= 10 and batches.read >= 40
    assert any(p.startswith(f"shard {changed} changed") for p in batches.take_problems())


def test_a_shard_is_hashed_once_unless_its_file_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_source(tmp_path / "a", 10, 10, "a")
    shard = source.shards[0]
    recorded = shard_digests([shard])[0]
    hashes = []
    real = shards_mod.file_sha256
    monkeypatch.setattr(shards_mod, "file_sha256", lambda p: hashes.append(p) or real(p))
    check = DigestCheck()
    assert check.changed(shard, recorded) is None and check.changed(shard, recorded) is None
    assert len(hashes) == 1  # the next epoch's open costs a stat, not a second hash
    retar_with_one_caption_altered(Path(shard))  # same size, new mtime
    assert "changed since the data stage indexed it" in (check.changed(shard, recorded) or "")
    assert len(hashes) == 2
    assert check.changed(shard, None) is None  # an index without digests: nothing to check


def test_remote_shard_is_checked_by_its_etag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec
    from moto.server import ThreadedMotoServer

    from filipctl.contract import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # one an earlier test of this process made holds its own endpoint
        local = write_source(tmp_path / "a", 10, 10, "a").shards[0]
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("shards-bucket")
        url = "s3://shards-bucket/00000.tar"
        fs.put(local, url)
        recorded = shard_digests([url])[0]
        assert recorded.startswith("etag:") and DigestCheck().changed(url, recorded) is None
        retar_with_one_caption_altered(Path(local))
        fs.put(local, url)
        message = DigestCheck().changed(url, recorded)
        assert message and message.startswith(f"shard {url} changed since the data stage indexed it (etag ")
    finally:
        server.stop()


def test_run_names_a_shard_changed_after_the_data_stage_and_fails_past_max_bad_fraction(tmp_path: Path) -> None:
    """One of 4 shards is rewritten the moment the data stage has indexed it (same size, so only its digest tells):
    with data.max_bad_fraction 0.05 the pretraining fails with one line and its log names the shard; raised to 0.6
    the rerun (data stage reused) trains without the shard and finishes."""
    sets = {"train.steps": 4, "train.checkpoint_every": 4, "train.log_every": 2, "optim.warmup_steps": 1,
            "data.synthetic.train_samples": 200, "data.synthetic.eval_samples": 20,
            "data.synthetic.samples_per_shard": 50, "data.train": tmp_path / "data" / "train",
            "data.eval": tmp_path / "data" / "eval", "output_dir": tmp_path / "runs",
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "data.max_bad_fraction": 0.05,
            "train.max_restarts": 0}  # a data error is not one a restart can mend
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    cli = subprocess.Popen([*FILIPCTL, "run", str(ROOT / "recipes/smoke.yaml"), *args], cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    changed = tmp_path / "data" / "train" / "00001.tar"
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("**/data.json")):
        assert cli.poll() is None and time.time() < deadline, "the data stage never wrote its index"
        time.sleep(0.05)
    retar_with_one_caption_altered(changed)
    out, _ = cli.communicate(timeout=600)
    assert cli.returncode != 0, out
    assert "Traceback" not in out and "data.max_bad_fraction 0.05" in out, out
    (log,) = (tmp_path / "runs").glob("**/pretrain-*/logs/pretrain.log")
    assert f"shard {changed} changed since the data stage indexed it (sha256 " in log.read_text()

    rerun = run_cli("run", str(ROOT / "recipes/smoke.yaml"), *args, "--set", "data.max_bad_fraction=0.6",
                    cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the data stage was reused, not rerun (a new index would have recorded the changed shard's digest)
    logs = [p for p in (tmp_path / "runs").glob("**/pretrain-*/logs/pretrain.log") if p != log]
    assert len(logs) == 1 and f"shard {changed} changed since the data stage indexed it" in logs[0].read_text()
