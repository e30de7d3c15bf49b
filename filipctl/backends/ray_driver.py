"""The Ray driver for one stage: join the Ray cluster, then run the stage there.

    python -m filipctl.backends.ray_driver --stage pretrain --workdir DIR
    python -m filipctl.backends.ray_driver --probe ADDRESS        (print each node's resources)

A distributed stage (pretraining) runs as a Ray Train TorchTrainer: each worker calls the same
job `run()` as the other backends, with a checkpoint store that reports every DeepSpeed
checkpoint (each worker's ZeRO shards) to Ray Train and restores from `ray.train.get_checkpoint()`
after a worker failure (FailureConfig). Other stages run as one Ray task each. This module is
started as its own process by the Ray backend; the CLI itself never imports ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filipctl.backends.ray import missing_resources, placement_note, probe_address
from filipctl.backends.ray_jobs import is_jobs_address
from filipctl.contract import (ENV_RANK_CPUS, TAG_RAY_RUN, TAG_RAY_STORAGE, JobError, RunDir, exit_status,
                               forwarded_env, read_recipe, write_error_record)
from filipctl.schema import RayProfile, Recipe
from filipctl.orchestration.stages import Stage, find_stage


class RayCheckpoints:
    """CheckpointStore for Ray Train: every rank saves its shards to a temp dir and reports it.

    `attempt`: which worker group of the Ray Train run this is (a restart after a failure, FailureConfig, or an elastic
    resize), recorded on the stage's run when it resumes, as torchrun's restarts are (jobs/train/pretrain.py
    record_restart); None on ranks other than 0."""

    def __init__(self, run_dir: RunDir | None = None, attempt: "Attempt | None" = None, max_failures: int = 0) -> None:
        self.run_dir, self.attempt, self.max_failures = run_dir, attempt, max_failures

    def restore(self, engine, global_batch: int):
        """Ray Train's latest checkpoint into the engine (at whatever size saved it: jobs/train/checkpoints.load_into)
        -> jobs.train.checkpoints.Restored."""
        import ray.train

        from jobs.train.checkpoints import Restored, load_into

        ckpt = ray.train.get_checkpoint()
        restored = Restored()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                tag = (Path(d) / "latest").read_text().strip()
                restored = load_into(engine, Path(d), tag, global_batch)
            restored.source = f"ray checkpoint {ckpt.path} ({tag})"
        if self.attempt is not None and self.attempt.previous is not None and engine.global_rank == 0:
            self._record_restart(restored.step, self.attempt)
        return restored

    def _record_restart(self, start: int, attempt: "Attempt") -> None:
        """The log, the events and the stage's run say that Ray restarted the workers, from which step, and why: the
        attempt before failed, or Ray Train resized an elastic group (tags filipctl.restarts and filipctl.restart.K,
        metric `restarts` at that step)."""
        from jobs.events import emit
        from jobs.stage_logger import StageLogger

        before = attempt.previous
        assert before is not None
        why = last_failure(self.run_dir, since=before.started) if self.run_dir else None
        if why is None and before.world != attempt.world:  # no error since the last start: Ray grew (or shrank) it
            why = f"Ray Train resized the elastic worker group from {before.world} to {attempt.world} workers"
            note = (f"restart {attempt.index} (elastic resize {before.world} -> {attempt.world}): resuming from step "
                    f"{start}")
            emit(note, stage="pretrain", restart=attempt.index, resumed_at=start)
        else:
            note = (f"restart {attempt.index} of {self.max_failures} (Ray Train FailureConfig): resuming from step "
                    f"{start}")
            emit(note + (f"; the attempt before failed: {why}" if why else ""), stage="pretrain",
                 restart=attempt.index, resumed_at=start)
        logger = StageLogger(True)
        logger.restart(attempt.index, start, why or "no error recorded")
        logger.sync()

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        import ray.train

        from jobs.train.checkpoints import write_data_state

        with tempfile.TemporaryDirectory(prefix="filip-ckpt-") as tmp:
            write_data_state(Path(tmp) / f"step{step}", engine.global_rank, data_state)
            # The same client state as DirectoryCheckpoints: what a resume checks (global batch, ZeRO stage) is in it.
            engine.save_checkpoint(tmp, tag=f"step{step}", client_state={**metrics, "step": step})
            # Every worker reports the same number of times; Ray merges their shards into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def last_failure(run_dir: RunDir, since: float = 0.0) -> str | None:
    """The newest error record of the stage's workers (written after `since`, a time.time()), as one line naming the
    rank that wrote it and its host."""
    from filipctl.contract import describe_error

    records = []
    for path in run_dir.errors.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("time"), (int, float))
               and r["time"] >= since]
    if not records:
        return None
    newest = max(records, key=lambda r: r["time"])
    return f"{describe_error(newest)} (reported on {newest.get('host', '?')})"


@dataclass(frozen=True)
class Attempt:
    """One worker group of the driver's Ray Train run: its index (0 = the first), its size, when it started, and the
    one before it."""

    index: int
    world: int
    started: float
    previous: "Attempt | None" = None


def attempt_of(attempts: Path, world: int) -> Attempt:
    """This worker group's Attempt: rank 0 appends a line "pid world start-time" per group to a file the driver
    emptied when it started the run."""
    now = time.time()
    with open(attempts, "a+") as f:
        f.seek(0)
        lines = f.read().splitlines()
        f.write(f"{os.getpid()} {world} {now}\n")
    previous = None
    for index, line in enumerate(lines):
        _, w, t = (line.split() + ["0", "0"])[:3]  # (a line of an older driver holds the pid alone)
        previous = Attempt(index, int(w), float(t), previous)
    return Attempt(len(lines), world, now, previous)


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the stage's job `run()` with Ray's checkpoint store."""
    import ray.train

    os.environ.update(config["env"])
    run_dir = RunDir(Path(config["workdir"]))
    context = ray.train.get_context()
    attempt = attempt_of(Path(config["attempts"]), context.get_world_size()) if context.get_world_rank() == 0 else None
    store = RayCheckpoints(run_dir, attempt, config["max_failures"])
    try:
        importlib.import_module(config["module"]).run(read_recipe(run_dir), run_dir, store=store)
    except Exception as exc:  # its cause for the CLI (contract.write_error_record), then Ray's own handling
        write_error_record(run_dir, exc)
        raise


def _run_task(module: str, argv: list[str], env: dict[str, str]) -> int:
    """One Ray task: the stage's job `main()` -> its exit status (its error line reaches the driver's log)."""
    os.environ.update(env)
    return importlib.import_module(module).main(argv)


def connect(profile: RayProfile) -> None:
    import ray

    if is_jobs_address(profile.address):  # a stage of a graph run as a Ray job (graph_job.py): join its cluster
        profile = profile.model_copy(update={"address": "auto"})
    problem = probe_address(profile.address, profile.connect_timeout_s)
    if problem:
        raise JobError(f"Ray address {profile.address}: {problem}")
    # Inside a Ray job (a graph run through the Jobs API) the job's runtime_env, which graph_job submitted from the
    # profile, applies to this driver already: passing it again makes Ray refuse to merge the two (same env_vars).
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    kwargs: dict[str, Any] = {"runtime_env": None if in_job else (profile.runtime_env or None),
                              "logging_level": "WARNING", "log_to_driver": True}
    if profile.address == "local":
        # address="local", not None: without an address ray.init joins the last cluster `ray start` wrote down in
        # /tmp/ray (a standing cluster on this machine) instead of starting the private one.
        ray.init(address="local", num_cpus=profile.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    else:
        try:
            ray.init(address=profile.address, **kwargs)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
            # Something answered at the address but it is not a Ray this driver can join.
            why = " ".join(str(exc).split())[:400]
            if "runtime env" in why.lower() or "runtime_env" in why:  # Ray quotes the env, env_vars values included
                why = "Ray refused cluster.ray.runtime_env (its values are not shown: they may hold credentials)"
            raise JobError(f"Ray address {profile.address}: could not join the cluster: {why}") from None


def storage(profile: RayProfile) -> str:
    path = profile.storage_path
    return path if "://" in path else str(Path(path).resolve())


def recipe_timeout(run_dir: RunDir) -> float:
    """train.collective_timeout_s: Ray Train makes the process group, so it is told the recipe's timeout."""
    return read_recipe(run_dir).train.collective_timeout_s


def fit(stage: Stage, run_dir: RunDir, profile: RayProfile) -> None:
    """A distributed stage as a Ray Train run named after the stage folder, so a rerun finds its checkpoints."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    nodes = node_resources()
    problem = missing_resources(profile, nodes)
    if problem:  # Ray would wait for the resources forever: say so now
        raise JobError(problem)
    note = placement_note(profile, nodes)
    if note:
        print(note, flush=True)
    name = run_dir.root.name  # <stage>-<key> of the stage folder stages/<stage>-<key>/: one Ray Train run per key
    from jobs.stage_logger import StageLogger

    StageLogger(True).tags({TAG_RAY_RUN: name, TAG_RAY_STORAGE: profile.storage_path})
    # Ray Train copies each print() of a worker into its logger as well, which reaches the driver's log beside the
    # worker's own stdout: every line of the job twice. Its stdout alone (Ray hands it on to the controller, workers).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if profile.elastic:
        # After a lost node Ray Train sizes the new group from a view of the nodes refreshed every 20 s, so it first
        # asks for the old size, and waits this long for a placement that cannot come before it counts again (60 s by
        # default; measured on the test cluster: restarted 71 s after the kill with 60, 35 s with 20). The driver's
        # value reaches Ray Train's controller (one of the variables it propagates); one already set is kept.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(ELASTIC_START_TIMEOUT_S))
    attempts = run_dir.logs / "ray-attempts"  # counts the worker groups of this run: Ray restarts them (FailureConfig)
    attempts.parent.mkdir(parents=True, exist_ok=True)
    attempts.write_text("")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"module": stage.module, "workdir": str(run_dir.root),
                           "env": {**forwarded_env(), ENV_RANK_CPUS: str(profile.resources_per_worker.get("CPU", 1.0))},
                           "attempts": str(attempts), "max_failures": profile.max_failures},
        scaling_config=scaling_config(profile),
        torch_config=TorchConfig(backend="nccl" if profile.use_gpu else "gloo",
                                 timeout_s=int(recipe_timeout(run_dir))),
        run_config=RunConfig(name=name, storage_path=storage(profile),
                             failure_config=FailureConfig(max_failures=profile.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise JobError(f"Ray Train run {name} failed: {result.error}")
    print(f"ray train run {name}: checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)


ELASTIC_START_TIMEOUT_S = 20  # how long an elastic group waits for its placement before Ray Train counts again


def scaling_config(profile: RayProfile):
    """Ray Train's ScalingConfig of the profile. A range of workers (MIN, MAX) makes the group elastic (Ray Train V2):
    it starts with as many as the nodes' resources hold, up to MAX, once at least MIN fit; after a failure it restarts
    at what fits then; while it runs, every resize_interval_s it restarts larger when more fit. Each start runs the
    train loop afresh, which continues from the last checkpoint at the new size."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=profile.num_workers, use_gpu=profile.use_gpu,
                         resources_per_worker=dict(profile.resources_per_worker),
                         placement_strategy=profile.placement_strategy,
                         elastic_resize_monitor_interval_s=profile.resize_interval_s)


def run_stage(recipe: Recipe, stage: Stage, run_dir: RunDir) -> None:
    import ray

    profile = recipe.cluster.ray
    connect(profile)  # ray.init's SIGTERM handler (`filipctl cancel`) exits through the finally below
    # Its Ray job id: what owns this stage's actors and placement groups (`ray list placement-groups`).
    print(f"ray driver of {stage.name}: Ray job {ray.get_runtime_context().get_job_id()}", flush=True)
    try:
        if stage.distributed:
            fit(stage, run_dir, profile)
        else:
            from filipctl.contract import worker_args

            task = ray.remote(num_cpus=1)(_run_task)
            if ray.get(task.remote(stage.module, worker_args(run_dir), forwarded_env())):
                raise JobError(f"{stage.module} failed (its message is in the log above)")
    finally:
        ray.shutdown()


def node_resources() -> list[dict[str, float]]:
    """The total resources of each live node of the cluster joined (each holds `node:<ip>`, which names it)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def probe(address: str, timeout_s: float) -> None:
    """Join the cluster at `address` and print each live node's total resources as a JSON list (the CLI's
    pre-flight check places the workers on them: ray_placement.py)."""
    import ray

    connect(RayProfile(address=address, connect_timeout_s=timeout_s))
    try:
        print(json.dumps(node_resources()), flush=True)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", metavar="ADDRESS", help="only print the resources of the cluster at ADDRESS")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--stage", help="the stage of the recipe to run (data, pretrain, eval)")
    parser.add_argument("--workdir", help="the run folder the CLI prepared (recipe.json inside)")
    args = parser.parse_args(argv)
    if args.probe:
        return exit_status(lambda: probe(args.probe, args.timeout))
    if not (args.stage and args.workdir):
        parser.error("--stage and --workdir are required")
    run_dir = RunDir(Path(args.workdir))

    def drive() -> None:
        recipe = read_recipe(run_dir)
        run_stage(recipe, find_stage(recipe, args.stage), run_dir)

    return exit_status(drive, run_dir)


if __name__ == "__main__":
    sys.exit(main())
