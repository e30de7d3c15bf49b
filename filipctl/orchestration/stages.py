"""A recipe's plan: the ordered stages (data -> pretrain -> eval), each a job any backend can run."""

from __future__ import annotations

from dataclasses import dataclass, field

from filipctl.schema import Recipe


@dataclass(frozen=True)
class Stage:
    """One job: the job module `MODULE` (its `main(argv)`; contract.worker_argv) on `processes` worker processes.

    A distributed module also offers `run(recipe, run_dir, store=...)`, which a driver that
    starts the workers itself (Ray Train) calls with its own checkpoint store.
    """

    name: str
    module: str
    processes: int = 1
    distributed: bool = False  # True: started as a torch.distributed group of `processes` ranks
    after: tuple[str, ...] = field(default_factory=tuple)  # stages that must succeed first
    key_metric: str = ""  # shown by `filipctl status`
    max_restarts: int = 0  # a distributed stage on the local backend: torchrun --max-restarts


def plan(recipe: Recipe) -> list[Stage]:
    stages = [
        Stage("data", "jobs.data.prepare", key_metric="train_pairs"),
        Stage("pretrain", "jobs.train.pretrain", processes=recipe.train.workers, distributed=True,
              after=("data",), key_metric="final_loss", max_restarts=recipe.train.max_restarts),
    ]
    ev = recipe.eval
    if ev.enabled and ((ev.held_out and recipe.data.eval is not None) or ev.datasets):
        stages.append(Stage("eval", "jobs.eval.evaluate", after=("pretrain",), key_metric="zeroshot_top1"))
    return stages


def find_stage(recipe: Recipe, name: str) -> Stage:
    for stage in plan(recipe):
        if stage.name == name:
            return stage
    raise KeyError(f"recipe {recipe.name} has no stage {name!r}")
