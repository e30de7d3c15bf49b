"""Where a stage would run and the rendezvous its workers would use, in one line, for --dry-run.

Read from the cluster profile; on a Slurm login node the partition's nodes are added (sinfo), so that a plan made
on a laptop differs only by that.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache

from filipctl.orchestration.stages import Stage
from filipctl.schema import Recipe


def _local(recipe: Recipe, stage: Stage) -> str:
    if not stage.distributed:
        return "this machine, 1 process"
    return (f"this machine, {stage.processes} processes (torchrun); rendezvous 127.0.0.1 on a free port "
            "chosen at submission")


@lru_cache(maxsize=8)  # one sinfo per partition for a whole plan
def partition_nodes(partition: str | None) -> str:
    """' (its nodes: filip-n[1-2])' from sinfo on a login node, '' elsewhere or when sinfo does not answer."""
    if shutil.which("sinfo") is None:
        return ""
    argv = ["sinfo", "-h", "-o", "%N"] + (["-p", partition] if partition else [])
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return ""
    nodes = ",".join(res.stdout.split()) if res.returncode == 0 else ""
    return f" (its nodes: {nodes})" if nodes else ""


def _slurm(recipe: Recipe, stage: Stage) -> str:
    p = recipe.cluster.slurm
    where = (f"partition {p.partition}" if p.partition else "the default partition") + partition_nodes(p.partition)
    if not stage.distributed:
        return f"Slurm: 1 task on 1 node of {where}"
    gpus = f", {p.gpus_per_node} GPUs each" if p.gpus_per_node else ""
    sizes = p.world_sizes
    chosen = (f"chosen by Slurm, as many as are free when the job starts (again after a requeue): {sizes[0]} to "
              f"{sizes[-1]} workers" if p.elastic else "chosen by Slurm")
    return (f"Slurm: {p.nodes} node(s) x {p.tasks_per_node} task(s){gpus} of {where}, {chosen}; rendezvous "
            "the first node of the allocation (SLURM_JOB_NODELIST), port 20000 + job id mod 12000 (the same on "
            "every requeue; jobs running at once differ unless their ids are 12000 apart)")


def _ray(recipe: Recipe, stage: Stage) -> str:
    p = recipe.cluster.ray
    cluster = "a private Ray on this machine" if p.address == "local" else f"the Ray cluster at {p.address}"
    if not stage.distributed:
        how = "a process on this machine" if p.address == "local" else "a Ray task"
        return f"Ray: {how} ({cluster})"
    each = dict(p.resources_per_worker)
    if p.use_gpu:
        each.setdefault("GPU", 1.0)
    strategy = p.placement_strategy
    elastic = (f" (elastic: as many as the nodes hold at each start and restart, grown when more fit, checked every "
               f"{p.resize_interval_s:g} s)" if p.elastic else "")
    return (f"Ray Train: {p.workers} workers x {each} in one placement group ({strategy}){elastic} on {cluster}; "
            "rendezvous the rank-0 worker's node, chosen by Ray Train")


def describe_placement(recipe: Recipe, stage: Stage) -> str:
    """'<where it runs>; rendezvous <address>' for the stage under the recipe's cluster profile."""
    return {"local": _local, "slurm": _slurm, "ray": _ray}[recipe.cluster.backend](recipe, stage)
