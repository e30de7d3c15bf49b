"""The Ray driver for one stage: join the Ray cluster, then run the stage there.

    python -m jobs.ray_train --module jobs.pretrain --recipe R.json --workdir DIR

Pretraining runs as a Ray Train TorchTrainer: each worker calls the same `jobs.pretrain.train`
as the other backends, with a checkpoint store that reports every DeepSpeed checkpoint (each
worker's ZeRO shards) to Ray Train and restores from `ray.train.get_checkpoint()` after a
worker failure (FailureConfig). Data and eval run as one Ray task each.
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
from filipctl.schema import RayProfile
from filipctl.tracking import TAG_RAY_RUN

# What the workers need from the driver's environment: where to log. Credentials are not
# forwarded: on a private Ray the workers inherit the driver's environment, and a remote
# cluster brings its own.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "FILIPCTL_MLFLOW_RUN_ID", "FILIPCTL_EVENTS")


class RayCheckpoints:
    """CheckpointStore for Ray Train: every rank saves its shards to a temp dir and reports it."""

    def restore(self, engine) -> tuple[int, str]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0, ""
        with ckpt.as_directory() as d:
            tag = (Path(d) / "latest").read_text().strip()
            engine.load_checkpoint(d, tag=tag)
        return int(tag.removeprefix("step")), f"ray checkpoint {ckpt.path} ({tag})"

    def save(self, engine, step: int, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="filip-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=f"step{step}", client_state={"step": step})
            # Every worker reports the same number of times; Ray merges their shards into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _train_loop(config: dict[str, Any]) -> None:
    os.environ.update(config["env"])
    from jobs.pretrain import train

    train(config["recipe"], Path(config["workdir"]), store=RayCheckpoints())


def _run_module(module: str, argv: list[str], env: dict[str, str]) -> int:
    os.environ.update(env)
    try:
        return importlib.import_module(module).main(argv) or 0
    except SystemExit as exc:
        if exc.code in (0, None):
            return 0
        raise RuntimeError(str(exc.code)) from None


def connect(profile: RayProfile) -> None:
    import ray

    problem = probe_address(profile.address, profile.connect_timeout_s)
    if problem:
        raise SystemExit(f"Ray address {profile.address}: {problem}")
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
            raise SystemExit(f"Ray address {profile.address}: could not join the cluster: {why}") from None


def storage(profile: RayProfile) -> str:
    path = profile.storage_path
    return path if "://" in path else str(Path(path).resolve())


def fit(recipe: dict[str, Any], workdir: Path, profile: RayProfile, env: dict[str, str]) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    problem = missing_resources(profile, ray.cluster_resources())
    if problem:  # Ray would wait for the resources forever: say so now
        raise SystemExit(problem)
    name = workdir.name  # = <recipe>-<fingerprint>: a rerun of the same recipe finds its checkpoints
    from jobs.metrics import StageLogger

    StageLogger(True).tags({TAG_RAY_RUN: name, "filipctl.ray_storage": profile.storage_path})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"recipe": recipe, "workdir": str(workdir), "env": env},
        scaling_config=ScalingConfig(num_workers=profile.workers, use_gpu=profile.use_gpu,
                                     resources_per_worker=dict(profile.resources_per_worker)),
        torch_config=TorchConfig(backend="nccl" if profile.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage(profile),
                             failure_config=FailureConfig(max_failures=profile.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise SystemExit(f"Ray Train run {name} failed: {result.error}")
    print(f"ray train run {name}: checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)


def probe(address: str, timeout_s: float) -> int:
    """Join the cluster at `address` and print its total resources as JSON (the CLI's pre-flight check)."""
    import ray

    connect(RayProfile(address=address, connect_timeout_s=timeout_s))
    try:
        print(json.dumps(ray.cluster_resources()), flush=True)
    finally:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", metavar="ADDRESS", help="only print the resources of the cluster at ADDRESS")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--module")
    parser.add_argument("--recipe")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args.probe, args.timeout)
    if not (args.module and args.recipe and args.workdir):
        parser.error("--module, --recipe and --workdir are required")
    recipe = json.loads(Path(args.recipe).read_text())
    profile = RayProfile.model_validate(recipe["cluster"]["ray"])
    workdir = Path(args.workdir)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    import ray

    connect(profile)  # ray.init's SIGTERM handler (`filipctl cancel`) exits through the finally below
    try:
        if args.module == "jobs.pretrain":
            fit(recipe, workdir, profile, env)
        else:
            task = ray.remote(num_cpus=1)(_run_module)
            ray.get(task.remote(args.module, ["--recipe", args.recipe, "--workdir", args.workdir], env))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
