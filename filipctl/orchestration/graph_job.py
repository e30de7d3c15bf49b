"""A stage graph run as ONE Ray job, when cluster.ray.address is a cluster's Jobs API (http://HEAD:8265).

The submitting command does everything that needs no cluster process: the checks (preflight: the Jobs API answers,
the workers fit the nodes), the stage folders, the MLflow runs (so `filipctl status` shows every stage at once),
then writes the graph it planned to the shared output_dir and submits one Ray job whose entrypoint is this module,
on the head:

    python -m filipctl.orchestration.graph_job OUTPUT_DIR/ray-jobs/<job id>/graph.json

There the graph runner (pipeline.GraphRun.execute, as for a local run) starts each stage's driver
(backends/ray_in_job.py), independent stages at once while their workers fit the nodes, records every transition in
the state index and MLflow, and at the end writes outcome.json beside graph.json (for an ablation, after its
table). The submitting machine may go away; without --detach it follows the Ray job's log until the job ends,
then reads outcome.json. Ray's `stop_job` (filipctl cancel) stops the runner and every driver; their trainers and
placement groups end with the drivers' Ray jobs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from filipctl.backends import ray_jobs
from filipctl.contract import TAG_JOB, write_atomic
from filipctl.errors import FilipctlError
from filipctl.orchestration.graph import Graph, Node
from filipctl.orchestration.stages import Stage
from filipctl.schema import Recipe
from filipctl.states import State

if TYPE_CHECKING:
    from filipctl.backends.ray_in_job import InJobBackend
    from filipctl.orchestration.pipeline import GraphRun
    from filipctl.orchestration.runner import Transition

FOLLOW_S = 2.0  # how often a following command asks for the Ray job's state and log
TAG_RAY_JOB = "filipctl.ray_job"  # on the top MLflow run: "<job id> <Jobs API address>"


@dataclass(frozen=True)
class GraphJob:
    """A graph submitted as a Ray job: where to ask about it, and its folder on the shared output_dir."""

    address: str
    job_id: str
    folder: Path  # graph.json (what the runner runs), outcome.json (how it ended)
    top: str  # the MLflow run a person opens (the pipeline, or the ablation)

    @property
    def spec(self) -> Path:
        return self.folder / "graph.json"

    @property
    def outcome(self) -> Path:
        return self.folder / "outcome.json"

    def read_outcome(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.outcome.read_text())
        except (OSError, ValueError):
            return None


# -- the graph, written by the submitting command and read back by the runner -----------------------------------

def graph_to_dict(graph: Graph) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes.values():
        # A node reads the recipe of the first variant that uses it (graph.py): kept by that variant's name.
        if node.recipe != graph.recipes[node.variants[0]]:
            raise FilipctlError(f"stage {node.name}: its recipe is not its first variant's; cannot submit the graph")
        nodes.append({"key": node.key, "stage": asdict(node.stage), "recipe_of": node.variants[0], "deps": node.deps,
                      "run_dir": str(node.run_dir.root), "variants": node.variants,
                      "external": {k: list(v) for k, v in node.external.items()}})
    return {"recipes": {v: r.model_dump(mode="json") for v, r in graph.recipes.items()}, "variants": graph.variants,
            "nodes": nodes}


def graph_from_dict(data: dict[str, Any]) -> Graph:
    from filipctl.contract import RunDir

    recipes = {v: Recipe.model_validate(r) for v, r in data["recipes"].items()}
    nodes = {}
    for n in data["nodes"]:
        stage = Stage(**{**n["stage"], "after": tuple(n["stage"]["after"])})
        nodes[n["key"]] = Node(n["key"], stage, recipes[n["recipe_of"]], dict(n["deps"]), RunDir(Path(n["run_dir"])),
                               list(n["variants"]), {k: (v[0], v[1]) for k, v in n["external"].items()})
    return Graph(nodes, {v: dict(keys) for v, keys in data["variants"].items()}, recipes)


# -- the submitting command ----------------------------------------------------------------------------------------

def applies(recipe: Recipe) -> bool:
    """Whether the recipe's cluster is a Ray cluster's Jobs API, where a graph runs as one Ray job."""
    return recipe.cluster.backend == "ray" and ray_jobs.is_jobs_address(recipe.cluster.ray.address)


def run_pipeline(recipe: Recipe, recipe_path: str, console: Console, fresh: bool = False, detach: bool = False):
    """`filipctl run` as one Ray job -> what pipeline.run_pipeline returns once it ended; None when detached."""
    from filipctl.orchestration.pipeline import GraphRun, PipelineResult

    t0 = time.time()
    job = submit(GraphRun({"": recipe}, console, force=fresh), recipe_path, console)
    outcome = _outcome(job, console, detach)
    if outcome is None:
        return None
    return PipelineResult(outcome["run_id"], outcome["tracking_uri"], Path(outcome["workdir"]), outcome["metrics"],
                          time.time() - t0)


def run_ablation(recipe: Recipe, recipe_path: str, components: list[str], seeds: list[int], console: Console,
                 force: bool = False, detach: bool = False) -> dict[str, Any] | None:
    """`filipctl ablate` as one Ray job -> what ablation.run_ablation returns once it ended; None when detached."""
    from filipctl.orchestration import ablation
    from filipctl.orchestration.pipeline import GraphRun

    run = GraphRun(ablation.variants(recipe, components, seeds), console, force=force)
    job = submit(run, recipe_path, console, ablation=ablation.labels(recipe, components, seeds),
                 ablation_args={"components": components, "seeds": seeds})
    outcome = _outcome(job, console, detach)
    return None if outcome is None else outcome["ablation"]


def _outcome(job: GraphJob, console: Console, detach: bool) -> dict[str, Any] | None:
    """None when detached (said how to follow), else the ended job's outcome.json; a failed graph raises RunFailed."""
    from filipctl.orchestration.pipeline import RunFailed

    if detach:
        _detached(job, console)
        return None
    outcome = follow(job, console)
    if outcome.get("error"):
        raise RunFailed(outcome["error"])
    return outcome


def _detached(job: GraphJob, console: Console) -> None:
    console.print(f"detached: the graph runs on the cluster as Ray job {job.job_id}. Follow with: filipctl status   "
                  f"filipctl logs {job.top[:8]}   filipctl cancel {job.top[:8]}", highlight=False, markup=False,
                  soft_wrap=True)


def submit(run: "GraphRun", recipe_path: str, console: Console, ablation: dict[str, Any] | None = None,
           ablation_args: dict[str, Any] | None = None) -> GraphJob:
    """Check, prepare and track the graph here, then submit it as one Ray job -> the job.

    `ablation`: the MLflow parent's labels (ablation.labels); `ablation_args`: {"components", "seeds"}, from which
    the runner makes the table once the graph ended. Bad address, unreachable or too small a cluster: CannotRun
    (exit 2) from the preflight, before anything is written."""
    uri = run.preflight()
    profile = run.first.cluster.ray
    address = profile.address.rstrip("/")
    slots = ray_jobs.worker_slots(profile, run.backend.cluster_nodes())
    run.own_stages()
    try:
        run.open_runs(uri, recipe_path, ablation)
        job = GraphJob(address, f"filipctl-{run.top[:12]}", Path(run.first.output_dir) / "ray-jobs" /
                       f"filipctl-{run.top[:12]}", run.top)
        run.tracker.tag(run.top, TAG_RAY_JOB, f"{job.job_id} {address}")
        job.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(job.spec, json.dumps({
            "job_id": job.job_id, "address": address, "cwd": os.getcwd(), "tracking_uri": uri,
            "experiment": run.first.tracking.experiment, "force": run.force, "label": run.label, "tags": run.tags,
            "slots": slots, "top": run.top, "variant_runs": run.sink.variant_runs,
            "stage_runs": [[v, k, r] for (v, k), r in run.sink.stage_runs.items()],
            "ablation": ablation_args, "graph": graph_to_dict(run.graph)}, indent=1))
        label = "ablation" if ablation is not None else "run"
        console.print(f"{label} {run.first.name} on ray: {len(run.graph.nodes)} stages, {len(run.to_run())} to run  "
                      f"mlflow run {run.top}", highlight=False, markup=False, soft_wrap=True)
        for note in run.sink.source_notes:
            console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        # What this command recorded goes in before the runner's records of the same runs.
        run.tracker.flush(run.first.tracking.drain_s)
    except BaseException:
        run.locks.release()
        raise
    run.locks.release()  # the runner on the head takes them
    try:
        _submit_job(job, profile.runtime_env)
    except Exception as exc:  # noqa: BLE001 - whatever the Jobs API said: nothing runs, the runs end here
        run.sink.close({k: State.SKIPPED for k in run.graph.nodes}, {})
        for node in run.graph.nodes.values():
            for stage_run in run.sink.runs_of(node):
                run.tracker.set_state(stage_run, State.SKIPPED)
        run.tracker.flush(run.first.tracking.drain_s)
        raise FilipctlError(f"the Ray Jobs API at {address} did not take the graph's job: "
                            f"{' '.join(str(exc).split())[:400]}") from None
    # Every stage to run is the Ray job's from now on (the runner on the head records the same ref when it starts
    # one): `status`, `logs` and `cancel` ask Ray whether it lives, even before it started. Recorded once Ray has
    # the job: a job Ray does not know would read as one that ended.
    for node in run.to_run():
        ref = str(ray_jobs.StageRef(address, job.job_id, node.run_dir.job_record(node.stage.name)))
        for stage_run in run.sink.runs_of(node):
            run.tracker.tag(stage_run, TAG_JOB, ref)
    run.tracker.flush(run.first.tracking.drain_s)
    console.print(f"submitted as Ray job {job.job_id} to {address} (its log: ray job logs -f {job.job_id} "
                  f"--address {address})", highlight=False, markup=False, soft_wrap=True)
    return job


def _submit_job(job: GraphJob, runtime_env: dict[str, Any]) -> None:
    # The same Python environment on the head (the cluster file system holds it, as for Slurm's nodes), started in
    # this command's working folder: relative paths of the recipe (tracking store, Ray storage) mean the same there.
    entrypoint = (f"cd {shlex.quote(os.getcwd())} && exec {shlex.quote(sys.executable)} -m "
                  f"filipctl.orchestration.graph_job {shlex.quote(str(job.spec))}")
    env_vars = {"PYTHONUNBUFFERED": "1", **dict(runtime_env.get("env_vars") or {})}
    ray_jobs.client(job.address).submit_job(entrypoint=entrypoint, submission_id=job.job_id,
                                            runtime_env={"env_vars": env_vars},
                                            metadata={"filipctl.run": job.top})


def follow(job: GraphJob, console: Console) -> dict[str, Any]:
    """Print the Ray job's log as it grows until the job ends -> its outcome.json. Ctrl-C stops the job (every
    stage driver, trainer and placement group)."""
    from filipctl.orchestration.pipeline import RunFailed

    jobs = ray_jobs.client(job.address)
    shown = 0
    try:
        while True:
            try:
                status = str(jobs.get_job_status(job.job_id))
                text = jobs.get_job_logs(job.job_id)
            except Exception as exc:  # noqa: BLE001 - the head went away, or this machine's network did
                raise FilipctlError(f"lost the Ray Jobs API at {job.address} while following Ray job {job.job_id} "
                                    f"({type(exc).__name__}); the job goes on without this command: `filipctl "
                                    f"status`, `filipctl logs {job.top[:8]}`, `filipctl cancel {job.top[:8]}`") from None
            if len(text) > shown:
                console.file.write(text[shown:])
                console.file.flush()
                shown = len(text)
            if status not in ray_jobs.ALIVE:
                break
            time.sleep(FOLLOW_S)
    except KeyboardInterrupt:
        console.print(f"stopping Ray job {job.job_id} ...", highlight=False, markup=False)
        status = ray_jobs.stop(job.address, job.job_id)
        raise RunFailed(f"interrupted: stopped Ray job {job.job_id} ({status}); a rerun resumes from the latest "
                        "checkpoint and reuses the stages that finished") from None
    outcome = job.read_outcome()
    if outcome is None:
        tail = "\n".join("    " + ln for ln in text.splitlines()[-15:])
        raise RunFailed(f"Ray job {job.job_id} ended {status} before its graph did (`filipctl status` shows each "
                        f"stage); the last lines of its log:\n{tail}")
    return outcome


# -- the graph runner, inside the Ray job on the head --------------------------------------------------------------

class _Transitions:
    """Each stage's change of state as one line of the Ray job's log (what a follower and `ray job logs` show)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def changed(self, t: "Transition") -> None:
        if t.new in (State.PENDING, State.CACHED):
            return  # cached: the progress view says it
        who = ", ".join(v for v in t.node.variants if v)  # an ablation's variants; a run's one has no name
        self.console.print(f"{time.strftime('%H:%M:%S')} {t.node.name}{f' ({who})' if who else ''}: "
                           f"{t.new.value.lower()}"
                           + (f" ({t.why})" if t.why else ""), highlight=False, markup=False, soft_wrap=True)


def execute(spec: dict[str, Any], console: Console, backend: "InJobBackend") -> dict[str, Any]:
    """Run the submitted graph with the MLflow runs the submitting command opened -> the outcome."""
    from filipctl.orchestration.ablation import record_table
    from filipctl.orchestration.pipeline import GraphRun
    from filipctl.tracking.sink import MlflowSink
    from filipctl.tracking.writer import Tracker

    graph = graph_from_dict(spec["graph"])
    run = GraphRun(graph.recipes, console, force=spec["force"], graph=graph, label=spec["label"], tags=spec["tags"],
                   backend=backend)
    run.own_stages()  # a stage another command took since the submission is followed, then reused or resumed
    try:
        sink = MlflowSink(Tracker(spec["tracking_uri"], spec["experiment"]), run.graph, backend.name)
        sink.top, sink.variant_runs = spec["top"], dict(spec["variant_runs"])
        sink.stage_runs = {(v, k): r for v, k, r in spec["stage_runs"]}
        run.sink, run.top = sink, spec["top"]
        run.execute(subscribers=[_Transitions(console)])
    finally:
        run.locks.release()
    if spec["ablation"] is not None:  # its table names a failed variant; the submitting command says so
        return {"ablation": record_table(run, run.first, spec["ablation"]["components"], spec["ablation"]["seeds"])}
    failure = run.failure()
    if failure is not None:
        return {"error": str(failure)}
    keys = run.graph.variants[""]
    workdir = run.graph.nodes[keys.get("pretrain") or next(iter(keys.values()))].run_dir.root
    return {"run_id": run.top, "tracking_uri": spec["tracking_uri"], "workdir": str(workdir),
            "metrics": {stage: run.metrics.get(key, {}) for stage, key in keys.items()}}


def main(argv: list[str] | None = None) -> int:
    from filipctl.backends.ray_in_job import InJobBackend

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m filipctl.orchestration.graph_job GRAPH_JSON", file=sys.stderr)
        return 2
    spec_path = Path(args[0])
    spec = json.loads(spec_path.read_text())
    job = GraphJob(spec["address"], spec["job_id"], spec_path.parent, spec["top"])
    console = Console(file=sys.stdout, width=200, force_terminal=False, highlight=False)
    first = Recipe.model_validate(next(iter(spec["graph"]["recipes"].values())))
    backend = InJobBackend(first.cluster.ray, spec["address"], spec["job_id"], int(spec["slots"]))

    def stopping(signum, frame) -> None:  # Ray's stop_job (filipctl cancel): SIGTERM now, SIGKILL in 3 s
        backend.stopping = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopping)
    t0 = time.time()
    console.print(f"graph runner of Ray job {job.job_id} on {os.uname().nodename}: {len(spec['graph']['nodes'])} "
                  f"stages, {spec['slots']} worker slots on the cluster", highlight=False, markup=False)
    try:
        outcome = execute(spec, console, backend)
    except FilipctlError as exc:
        outcome = {"error": str(exc)}
    except KeyboardInterrupt:  # stopped outside the graph's own handling (before or after it ran)
        outcome = {"error": f"Ray job {job.job_id} was stopped"}
    outcome["duration_s"] = time.time() - t0
    write_atomic(job.outcome, json.dumps(outcome, indent=1))
    if outcome.get("error"):
        console.print(f"error: {outcome['error']}", highlight=False, markup=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
