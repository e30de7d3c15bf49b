"""One Ray scenario, run by tests/test_ray.py inside a loopback-only network namespace.

Ray listens on every interface (FINDINGS): the test starts this script under `unshare --net`,
so Ray, the moto S3 server and everything they talk to stay on that namespace's loopback.

    python tests/ray_scenario.py WORKDIR RESULT.json

It starts moto's S3 server on 127.0.0.1, runs `filipctl run recipes/smoke.yaml --cluster ray`
with checkpoints on s3://, kills one Ray Train worker once two checkpoints are in the bucket, waits for the run to finish,
then starts a standing Ray cluster (`ray start --head`): asks it for too many workers (GCS and
ray:// addresses) and cancels a long run on it (through Ray Client) while its workers train. What it
saw goes to RESULT.json for the test to judge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from filipctl.contract import free_port  # noqa: E402

SECRET = "filip-test-secret-9f3c1e7a"  # must never show up in anything filipctl writes
BUCKET = "filip-ckpt"


# Marks the processes of this scenario (Ray workers inherit it from their raylet): another Ray on
# the machine, e.g. a second test session, is not ours to count or kill.
MARK = f"FILIP_RAY_SCENARIO={os.getpid()}"


def train_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                if "RayTrainWorker" in cmd and MARK.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return sorted(pids)


def stop_own_ray() -> None:
    """Stop the standing cluster this scenario started: its processes by their MARK, never `ray stop`, which stops
    every Ray on the machine (the two-node test cluster's among them)."""
    mine = MARK.encode()
    ancestors = {os.getpid(), os.getppid()}
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) not in ancestors:
            try:
                if mine in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


def status_rows(work: Path, env: dict) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "filipctl.cli", "status", "--json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    return json.loads(res.stdout) if res.returncode == 0 else []


def start_head(env: dict) -> dict:
    """A standing Ray cluster (`ray start --head`), as a team would run one, with a Ray Client server."""
    gcs, client = free_port(), free_port()
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True)
    head = {"gcs": f"127.0.0.1:{gcs}", "client": f"ray://127.0.0.1:{client}"}
    t0 = time.time()
    while time.time() - t0 < 120:  # the client server is ready some time after `ray start` returns
        probe = subprocess.run([sys.executable, "-m", "filipctl.backends.ray_driver", "--probe", head["client"], "--timeout", "10"],
                               env=env, capture_output=True, text=True, cwd=ROOT)
        if probe.returncode == 0:
            break
        time.sleep(1)
    head["ready_after_s"] = time.time() - t0
    return head


def too_many_workers(work: Path, env: dict, argv: list[str], address: str) -> dict:
    """More workers than the standing cluster has CPUs: refused before anything is written."""
    where = work / f"too-many-{len(list(work.glob('too-many-*')))}"
    where.mkdir()
    t0 = time.time()
    res = subprocess.run([*argv, "--set", f"cluster.ray.address={address}", "--set", "cluster.ray.workers=8",
                          "--set", f"cluster.shared_dirs=[{work}]"],
                         cwd=where, env=env, capture_output=True, text=True, timeout=300)
    return {"rc": res.returncode, "stderr": res.stderr, "seconds": time.time() - t0,
            "written": [p.name for p in where.iterdir()]}


def cancel_phase(work: Path, env: dict, argv: list[str], address: str) -> dict:
    """A second, long run on the standing cluster: `filipctl cancel` from another process mid-training."""
    long_run = subprocess.Popen([*argv, "--set", "train.steps=5000", "--set", "cluster.ray.storage_path=ray-store",
                                 "--set", f"cluster.ray.address={address}",
                                 # a standing cluster may place workers on any node: the folders are declared shared
                                 "--set", f"cluster.shared_dirs=[{work}]"],
                                cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(train_workers()) < 2 and long_run.poll() is None and time.time() - t0 < 300:
        time.sleep(0.5)
    running = len(train_workers())
    cancel = subprocess.run([sys.executable, "-m", "filipctl.cli", "cancel"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=120)
    try:
        out, err = long_run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        long_run.kill()
        out, err = long_run.communicate()
    t1 = time.time()
    while train_workers() and time.time() - t1 < 60:  # Ray tears its workers down asynchronously
        time.sleep(0.5)
    rows = status_rows(work, env)
    return {"workers_running": running, "cancel_stdout": cancel.stdout, "cancel_stderr": cancel.stderr,
            "cancel_rc": cancel.returncode, "run_rc": long_run.returncode, "run_stderr": err[-5000:],
            "workers_left": train_workers(), "status": rows[0] if rows else None,
            "first_run_status": rows[1] if len(rows) > 1 else None}


def main() -> None:
    work, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    from moto.server import ThreadedMotoServer
    import s3fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "filip-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled",
           "COLUMNS": "200", MARK.split("=")[0]: MARK.split("=")[1]}
    fs = s3fs.S3FileSystem(key="filip-test-key", secret=SECRET, endpoint_url=env["AWS_ENDPOINT_URL"])
    fs.mkdir(BUCKET)
    steps = 40
    sets = {"train.steps": steps, "train.checkpoint_every": 10, "train.log_every": 10, "optim.warmup_steps": 5,
            "data.synthetic.train_samples": 600, "data.synthetic.eval_samples": 100,
            "data.synthetic.samples_per_shard": 200, "cluster.ray.storage_path": f"s3://{BUCKET}/ray"}
    argv = [sys.executable, "-m", "filipctl.cli", "run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "ray"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: dict = {}
    while proc.poll() is None and not killed and time.time() - t0 < 400:
        # Two checkpoints in the bucket: the first one is surely complete (every rank reported).
        ckpts = [p for p in fs.find(f"{BUCKET}/ray") if p.endswith("/latest")]
        workers = train_workers()
        if len(ckpts) >= 2 and len(workers) >= 2:
            victim = workers[-1]
            os.kill(victim, signal.SIGKILL)
            killed = {"pid": victim, "after_s": time.time() - t0, "checkpoints_before": len(ckpts)}
        time.sleep(0.5)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    runs = list((work / "runs").glob("stages/pretrain-*"))
    workdir = runs[0] if runs else work
    files = fs.find(f"{BUCKET}/ray")
    # Every byte filipctl wrote: run folder, MLflow store and artifacts, stdout/stderr, the S3 objects' names.
    leaked = []
    for path in [*work.rglob("*")]:
        if path.is_file() and SECRET.encode() in path.read_bytes():
            leaked.append(str(path))
    if SECRET in out + err:
        leaked.append("<cli output>")
    head = start_head(env)
    try:
        too_many = [too_many_workers(work, env, argv, head[k]) for k in ("gcs", "client")]
        cancel = cancel_phase(work, env, argv, head["client"])
    finally:
        stop_own_ray()
    result = {
        "head": head,
        "too_many": too_many,
        "cancel": cancel,
        "returncode": proc.returncode, "stdout": out, "stderr": err[-20000:], "killed": killed,
        "elapsed_s": time.time() - t0, "s3_files": files, "leaked": leaked, "steps": steps,
        "pretrain_log": (workdir / "logs" / "pretrain.log").read_text(errors="replace")
        if (workdir / "logs" / "pretrain.log").exists() else "",
        "pretrain_json": json.loads((workdir / "result.json").read_text())["metrics"] if (workdir / "result.json").exists() else None,
        "model_exists": (workdir / "model.pt").exists(),
    }
    result_file.write_text(json.dumps(result))
    server.stop()


if __name__ == "__main__":
    main()
