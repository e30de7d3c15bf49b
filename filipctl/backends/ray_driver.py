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
from pathlib import Path
from typing import Any

from filipctl.backends.ray import missing_resources, probe_address
from filipctl.backends.ray_jobs import is_jobs_address
from filipctl.contract import (ENV_RANK_CPUS, TAG_RAY_RUN, TAG_RAY_STORAGE, JobError, RunDir, exit_status,
                               forwarded_env, read_recipe, write_error_record)
from filipctl.schema import RayProfile, Recipe
from filipctl.orchestration.stages import Stage, find_stage


class RayCheckpoints:
    """CheckpointStore for Ray Train: every rank saves its shards to a temp dir and reports it.

    `restart`: which restart of the worker group this is (FailureConfig; 0 = the first attempt), recorded on the
    stage's run when it resumes, as torchrun's restarts are (jobs/train/pretrain.py record_restart)."""

    def __init__(self, run_dir: RunDir | None = None, restart: int = 0, max_failures: int = 0) -> None:
        self.run_dir, self.restart, self.max_failures = run_dir, restart, max_failures

    def restore(self, engine, rank: int) -> tuple[int, str, dict[str, Any] | None]:
        import ray.train

        from jobs.train.checkpoints import read_data_state

        ckpt = ray.train.get_checkpoint()
        start, source, data_state = 0, "", None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                tag = (Path(d) / "latest").read_text().strip()
                engine.load_checkpoint(d, tag=tag)
                data_state = read_data_state(Path(d) / tag, rank)
            start, source = int(tag.removeprefix("step")), f"ray checkpoint {ckpt.path} ({tag})"
        if self.restart and rank == 0:
            self._record_restart(start)
        return start, source, data_state

    def _record_restart(self, start: int) -> None:
        """The log, the events and the stage's run say that Ray restarted the workers, from which step, and why the
        attempt before failed (tags filipctl.restarts and filipctl.restart.K, metric `restarts` at that step)."""
        from jobs.events import emit
        from jobs.stage_logger import StageLogger

        why = last_failure(self.run_dir) if self.run_dir else None
        note = f"restart {self.restart} of {self.max_failures} (Ray Train FailureConfig): resuming from step {start}"
        emit(note + (f"; the attempt before failed: {why}" if why else ""), stage="pretrain", restart=self.restart,
             resumed_at=start)
        logger = StageLogger(True)
        logger.restart(self.restart, start, why or "no error recorded")
        logger.sync()

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        import ray.train

        from jobs.train.checkpoints import write_data_state

        with tempfile.TemporaryDirectory(prefix="filip-ckpt-") as tmp:
            write_data_state(Path(tmp) / f"step{step}", engine.global_rank, data_state)
            engine.save_checkpoint(tmp, tag=f"step{step}", client_state={"step": step})
            # Every worker reports the same number of times; Ray merges their shards into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def last_failure(run_dir: RunDir) -> str | None:
    """The newest error record of the stage's workers, as one line naming the rank that wrote it and its host."""
    from filipctl.contract import describe_error

    records = []
    for path in run_dir.errors.glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("time"), (int, float))]
    if not records:
        return None
    newest = max(records, key=lambda r: r["time"])
    return f"{describe_error(newest)} (reported on {newest.get('host', '?')})"


def attempt_of(attempts: Path) -> int:
    """Which attempt of the driver's Ray Train run this worker group is (0 = the first): rank 0 appends a line per
    attempt to a file the driver emptied when it started the run."""
    with open(attempts, "a+") as f:
        f.seek(0)
        before = len(f.read().splitlines())
        f.write(f"{os.getpid()}\n")
    return before


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the stage's job `run()` with Ray's checkpoint store."""
    import ray.train

    os.environ.update(config["env"])
    run_dir = RunDir(Path(config["workdir"]))
    restart = attempt_of(Path(config["attempts"])) if ray.train.get_context().get_world_rank() == 0 else 0
    store = RayCheckpoints(run_dir, restart, config["max_failures"])
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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    problem = missing_resources(profile, node_resources())
    if problem:  # Ray would wait for the resources forever: say so now
        raise JobError(problem)
    name = run_dir.root.name  # <stage>-<key> of the stage folder stages/<stage>-<key>/: one Ray Train run per key
    from jobs.stage_logger import StageLogger

    StageLogger(True).tags({TAG_RAY_RUN: name, TAG_RAY_STORAGE: profile.storage_path})
    # Ray Train copies each print() of a worker into its logger as well, which reaches the driver's log beside the
    # worker's own stdout: every line of the job twice. Its stdout alone (Ray hands it on to the controller, workers).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    attempts = run_dir.logs / "ray-attempts"  # counts the worker groups of this run: Ray restarts them (FailureConfig)
    attempts.parent.mkdir(parents=True, exist_ok=True)
    attempts.write_text("")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"module": stage.module, "workdir": str(run_dir.root),
                           "env": {**forwarded_env(), ENV_RANK_CPUS: str(profile.resources_per_worker.get("CPU", 1.0))},
                           "attempts": str(attempts), "max_failures": profile.max_failures},
        scaling_config=ScalingConfig(num_workers=profile.workers, use_gpu=profile.use_gpu,
                                     resources_per_worker=dict(profile.resources_per_worker),
                                     placement_strategy=profile.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if profile.use_gpu else "gloo",
                                 timeout_s=int(recipe_timeout(run_dir))),
        run_config=RunConfig(name=name, storage_path=storage(profile),
                             failure_config=FailureConfig(max_failures=profile.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise JobError(f"Ray Train run {name} failed: {result.error}")
    print(f"ray train run {name}: checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)


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
