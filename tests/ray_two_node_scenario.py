"""Ray on the two-node test cluster (scripts/ray-up.sh: head on filip-n1, worker on filip-n2), run by
tests/test_ray_two_node.py from the login host (the root namespace).

    python tests/ray_two_node_scenario.py WORKDIR RESULT.json [PHASE...]      (phases: refuse clean lost)

Every `filipctl` runs on filip-n1 (scripts/test-nodes.sh --exec): Ray's driver binds every interface, so it may
only run inside a node. Phases:
  refuse  workers the cluster cannot place though its totals would hold them: refused before anything is written
  clean   the recipe of conftest.longer_overrides, 2 workers one per node (clusters/ray-two-node.yaml)
  lost    the same recipe; once rank 0 is past step 25 (checkpoint at 20), filip-n2 is lost to Ray (its raylet and
          every Ray process on it SIGKILLed: scripts/ray-up.sh --kill; the Slurm daemons sharing the test node are
          not Ray's node and stay), brought back after DOWN_S seconds (scripts/ray-up.sh); the Ray Train run must
          resume from its last checkpoint and finish. Slurm's lost-node test loses filip-n2 too: this phase holds
          /tmp/filip-node-kill.lock (flock) from the run's start until the node is back.
What each phase saw goes to RESULT.json for the test to judge.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import longer_overrides  # noqa: E402

NODES = ROOT / "scripts" / "test-nodes.sh"
PYTHON = str(ROOT / ".venv" / "bin" / "python")  # the nodes run the same environment (shared file system)
HEAD = "10.77.0.11:6379"
KILL_LOCK = Path("/tmp/filip-node-kill.lock")  # another test (Slurm's lost node) kills filip-n2 too: one at a time
KILL_AFTER_STEP = 25  # the checkpoint at step 20 is in; the kill loses the steps after it
DOWN_S = 10.0  # how long the node stays lost before it is brought back


def on_head(*argv: str) -> list[str]:
    return [str(NODES), "--exec", "filip-n1", *argv]


def filipctl(folder: Path, *extra: str) -> list[str]:
    """`filipctl run` of the smoke recipe on filip-n1 with the suite's longer_overrides, everything under folder."""
    return on_head(PYTHON, "-m", "filipctl.cli", "run", str(ROOT / "recipes/smoke.yaml"), "--cluster", "ray-two-node",
                   *longer_overrides(folder), "--set", f"cluster.ray.storage_path={folder / 'ray'}", *extra)


def stage_folder(folder: Path, stage: str) -> Path | None:
    found = sorted((folder / "runs").glob(f"stages/{stage}-*"))
    return found[0] if found else None


def events(folder: Path) -> list[dict]:
    pre = stage_folder(folder, "pretrain")
    path = pre / "logs" / "pretrain.events.jsonl" if pre else None
    if not path or not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def tracked(folder: Path) -> dict[str, Any]:
    """The pretrain stage's MLflow run: tags, loss curve, metrics, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("filip")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "tags.`filipctl.stage` = 'pretrain'")
    if not runs:
        return {}
    pre = runs[0]
    history = client.get_metric_history(pre.info.run_id, "loss")
    return {"run_id": pre.info.run_id, "status": pre.info.status, "tags": pre.data.tags,
            "metrics": pre.data.metrics, "losses": {str(m.step): m.value for m in history},
            "loss_records": len(history), "artifacts": [a.path for a in client.list_artifacts(pre.info.run_id)]}


def finished(proc: subprocess.Popen, t0: float, timeout_s: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return {"rc": proc.returncode, "stdout": out[-6000:], "stderr": err[-10000:], "elapsed_s": time.time() - t0}


def outcome(folder: Path, run: dict[str, Any]) -> dict[str, Any]:
    pre = stage_folder(folder, "pretrain")
    result = pre / "result.json" if pre else None
    log = pre / "logs" / "pretrain.log" if pre else None
    return {**run, "tracked": tracked(folder), "events": events(folder),
            "result": json.loads(result.read_text())["metrics"] if result and result.exists() else None,
            "log": log.read_text(errors="replace")[-30000:] if log and log.exists() else ""}


# -- refuse ---------------------------------------------------------------------------------------------

def refuse(work: Path) -> list[dict[str, Any]]:
    """Requests whose totals fit the cluster (4 CPUs) but no node (2 CPUs each) can hold as asked."""
    cases = {"one_3cpu_worker": ["cluster.ray.workers=1", "cluster.ray.resources_per_worker={CPU: 3}"],
             "strict_pack_2x2": ["cluster.ray.workers=2", "cluster.ray.resources_per_worker={CPU: 2}",
                                 "cluster.ray.placement_strategy=STRICT_PACK"]}
    seen = []
    for name, sets in cases.items():
        where = work / f"refuse-{name}"
        where.mkdir()
        t0 = time.time()
        res = subprocess.run(filipctl(where, *[x for s in sets for x in ("--set", s)]), cwd=where,
                             capture_output=True, text=True, timeout=300)
        seen.append({"case": name, "rc": res.returncode, "stderr": res.stderr, "stdout": res.stdout,
                     "seconds": time.time() - t0, "written": sorted(p.name for p in where.iterdir())})
    return seen


# -- clean ----------------------------------------------------------------------------------------------

def clean(work: Path) -> dict[str, Any]:
    folder = work / "clean"
    folder.mkdir()
    t0 = time.time()
    proc = subprocess.Popen(filipctl(folder), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return outcome(folder, finished(proc, t0, 900))


# -- lost -----------------------------------------------------------------------------------------------

@contextmanager
def node_kill_lock() -> Iterator[float]:
    """Hold the machine-wide lock of lost-node tests -> seconds waited for it."""
    t0 = time.time()
    with open(KILL_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.time() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def script(*argv: str) -> dict[str, Any]:
    t0 = time.time()
    res = subprocess.run([str(ROOT / "scripts" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=600)
    return {"cmd": " ".join(argv), "rc": res.returncode, "seconds": time.time() - t0, "output": (res.stdout + res.stderr)[-3000:]}


def ray_nodes_alive() -> int:
    res = subprocess.run(on_head(str(ROOT / ".venv" / "bin" / "ray"), "status", f"--address={HEAD}"),
                         capture_output=True, text=True, timeout=60)
    active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def lost(work: Path) -> dict[str, Any]:
    from jobs.train.heartbeat import read_beats

    folder = work / "lost"
    folder.mkdir()
    kill: dict[str, Any] = {}
    # The lock from before the start: taken only at the kill, a wait for it could outlast the training.
    with node_kill_lock() as waited:
        t0 = time.time()
        proc = subprocess.Popen(filipctl(folder), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        while proc.poll() is None and time.time() - t0 < 600:
            steps = [e["done"] for e in events(folder) if "done" in e]
            if steps and max(steps) >= KILL_AFTER_STEP:
                break
            time.sleep(0.2)
        if proc.poll() is None and time.time() - t0 < 600:
            beats = read_beats(stage_folder(folder, "pretrain") / "logs" / "heartbeat")  # each rank's last step
            kill = {"lock_wait_s": waited, "t": time.time(), "after_s": time.time() - t0,
                    "beats": {r: b.step for r, b in beats.items()}, "kill": script("ray-up.sh", "--kill", "filip-n2")}
            time.sleep(DOWN_S)
            kill["down_s"] = DOWN_S
            kill["ray_up"] = script("ray-up.sh")
            kill["t_back"] = time.time()
            kill["ray_nodes_after"] = ray_nodes_alive()
    run = finished(proc, t0, 900)
    return {**outcome(folder, run), "kill": kill}


def main() -> None:
    work, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    phases = sys.argv[3:] or ["refuse", "clean", "lost"]
    result: dict[str, Any] = {"ray_nodes_before": ray_nodes_alive()}
    for phase in phases:
        result[phase] = {"refuse": refuse, "clean": clean, "lost": lost}[phase](work)
        result_file.write_text(json.dumps(result))  # what was seen so far, should a later phase hang


if __name__ == "__main__":
    main()
