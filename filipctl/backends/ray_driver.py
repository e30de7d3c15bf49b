"""The Ray driver for one stage: join the Ray cluster, then run the stage there.

    python -m filipctl.backends.ray_driver --stage pretrain --workdir DIR
    python -m filipctl.backends.ray_driver --probe ADDRESS        (print the cluster's resources)

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
from filipctl.contract import (TAG_RAY_RUN, TAG_RAY_STORAGE, JobError, RunDir, exit_status, forwarded_env, read_recipe,
                               write_error_record)
from filipctl.schema import RayProfile, Recipe
from filipctl.orchestration.stages import Stage, find_stage


class RayCheckpoints:
    """CheckpointStore for Ray Train: every rank saves its shards to a temp dir and reports it."""

    def restore(self, engine, rank: int) -> tuple[int, str, dict[str, Any] | None]:
        import ray.train

        from jobs.train.checkpoints import read_data_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0, "", None
        with ckpt.as_directory() as d:
            tag = (Path(d) / "latest").read_text().strip()
            engine.load_checkpoint(d, tag=tag)
            data_state = read_data_state(Path(d) / tag, rank)
        return int(tag.removeprefix("step")), f"ray checkpoint {ckpt.path} ({tag})", data_state

    def save(self, engine, step: int, metrics: dict[str, Any], data_state: dict[str, Any]) -> None:
        import ray.train

        from jobs.train.checkpoints import write_data_state

        with tempfile.TemporaryDirectory(prefix="filip-ckpt-") as tmp:
            write_data_state(Path(tmp) / f"step{step}", engine.global_rank, data_state)
            engine.save_checkpoint(tmp, tag=f"step{step}", client_state={"step": step})
            # Every worker reports the same number of times; Ray merges their shards into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the stage's job `run()` with Ray's checkpoint store."""
    os.environ.update(config["env"])
    run_dir = RunDir(Path(config["workdir"]))
    try:
        importlib.import_module(config["module"]).run(read_recipe(run_dir), run_dir, store=RayCheckpoints())
    except Exception as exc:  # its cause for the CLI (contract.write_error_record), then Ray's own handling
        write_error_record(run_dir, exc)
        raise


def _run_task(module: str, argv: list[str], env: dict[str, str]) -> int:
    """One Ray task: the stage's job `main()` -> its exit status (its error line reaches the driver's log)."""
    os.environ.update(env)
    return importlib.import_module(module).main(argv)


def connect(profile: RayProfile) -> None:
    import ray

    problem = probe_address(profile.address, profile.connect_timeout_s)
    if problem:
        raise JobError(f"Ray address {profile.address}: {problem}")
    kwargs: dict[str, Any] = {"runtime_env": profile.runtime_env or None, "logging_level": "WARNING",
                              "log_to_driver": True}
    if profile.address == "local":
        ray.init(num_cpus=profile.num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    else:
        try:
            ray.init(address=profile.address, **kwargs)
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
            # Something answered at the address but it is not a Ray this driver can join.
            why = " ".join(str(exc).split())[:400]
            raise JobError(f"Ray address {profile.address}: could not join the cluster: {why}") from None


def storage(profile: RayProfile) -> str:
    path = profile.storage_path
    return path if "://" in path else str(Path(path).resolve())


def recipe_timeout(run_dir: RunDir) -> float:
    """train.collective_timeout_s: Ray Train makes the process group, so it is told the recipe's timeout."""
    return read_recipe(run_dir).train.collective_timeout_s


def fit(stage: Stage, run_dir: RunDir, profile: RayProfile) -> None:
    """A distributed stage as a Ray Train run named after the stage folder, so a rerun finds its checkpoints."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    problem = missing_resources(profile, ray.cluster_resources())
    if problem:  # Ray would wait for the resources forever: say so now
        raise JobError(problem)
    name = run_dir.root.name  # <stage>-<key> of the stage folder stages/<stage>-<key>/: one Ray Train run per key
    from jobs.stage_logger import StageLogger

    StageLogger(True).tags({TAG_RAY_RUN: name, TAG_RAY_STORAGE: profile.storage_path})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"module": stage.module, "workdir": str(run_dir.root), "env": forwarded_env()},
        scaling_config=ScalingConfig(num_workers=profile.workers, use_gpu=profile.use_gpu,
                                     resources_per_worker=dict(profile.resources_per_worker)),
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


def probe(address: str, timeout_s: float) -> None:
    """Join the cluster at `address` and print its total resources as JSON (the CLI's pre-flight check)."""
    import ray

    connect(RayProfile(address=address, connect_timeout_s=timeout_s))
    try:
        print(json.dumps(ray.cluster_resources()), flush=True)
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
