"""Joining the process group a backend started (torchrun, Slurm tasks, Ray Train) with DeepSpeed."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from filipctl.contract import ENV_RANK_CPUS, JobError, free_port
from jobs.train.heartbeat import Heartbeat, who_stopped


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = True  # False when a launcher (Ray Train) created the process group
    collective_timeout_s: float | None = None  # None: the launcher's (Ray Train's TorchConfig.timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(collective_timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by the environment (torchrun-style RANK/WORLD_SIZE/MASTER_*).

    CPU-only machines use gloo and DeepSpeed's CPU accelerator; GPUs use NCCL. A collective that waits longer
    than `collective_timeout_s` (train.collective_timeout_s) raises instead of hanging: see `collectives_named`.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owns_group = not dist.is_initialized()
    if not dist.is_initialized() and "RANK" not in os.environ:  # a single process started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = timedelta(seconds=collective_timeout_s)
    if owns_group:  # Ray Train joins the group itself before our code runs, with its own timeout
        # Groups made later (DeepSpeed's data-parallel groups) take torch's module default, not the world's.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = timeout
        if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
            c10d.default_pg_nccl_timeout = timeout
        backend = "nccl" if use_cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _join_torchrun_group(backend, timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)  # (joins torch's group)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(rank_threads())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group,
                    collective_timeout_s if owns_group else None)


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR (the first node) from the
    variables of the Slurm job step this task runs in (srun's SLURM_STEP_*, else the job's). The world is the tasks
    srun started, whatever the job asked for: with a node range (cluster.slurm.nodes MIN-MAX) Slurm decides the count
    at each start, a requeued job may get fewer nodes than before. MASTER_PORT is the caller's to choose."""
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not (world and nodes and "SLURM_PROCID" in env):
        raise JobError("not inside a Slurm job step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) and "
                       "SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) are not all set; start the tasks with srun")
    node = int(env.get("SLURM_NODEID", "0"))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
    num_nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    local_world = per_node[node] if node < len(per_node) else int(world) // max(1, num_nodes)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": first_host(nodes)}


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts per node ("2(x3),1") -> [2, 2, 2, 1]; [] for ""."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "filip-n[1-2]" -> "filip-n1", "gpu[007-9,12]-ib,cpu1" -> "gpu007-ib"
    (scontrol show hostnames without calling it: the rank-0 task runs on the first node of its step)."""
    first = re.match(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist.strip())
    text = first.group(0) if first else nodelist
    return re.sub(r"\[([^],-]+)[^]]*\]", r"\1", text)


def rank_threads() -> int:
    """CPU threads of this rank: the cores its scheduler reserved for it when it says so (Slurm's --cpus-per-task,
    Ray Train's resources_per_worker), else this machine's cores shared among the ranks on it. Not the machine's cores
    alone: a rank alone on its node would then take them all, and its sums differ from those of a rank that shares
    (one loss curve on every backend takes the same threads per rank)."""
    reserved = os.environ.get(ENV_RANK_CPUS) or os.environ.get("SLURM_CPUS_PER_TASK")
    if reserved:
        return max(1, int(float(reserved)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def _join_torchrun_group(backend: str, timeout: timedelta) -> None:
    """The group torchrun started, through its agent's store under a prefix of this attempt.

    After torchrun restarts a failed group (--max-restarts), the agent's store still holds the previous
    attempt's keys: without a prefix of its own, every process group of the new attempt (DeepSpeed's
    data-parallel group among them) reads the old ranks' addresses and never connects.
    """
    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    prefix = f"filipctl/{env.get('TORCHELASTIC_RUN_ID', '')}/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=int(env["RANK"]),
                            world_size=int(env["WORLD_SIZE"]), timeout=timeout)


def collective_failure(exc: BaseException) -> str | None:
    """"timeout" or "closed" when `exc` is a collective that failed for want of another rank, else None."""
    if not isinstance(exc, RuntimeError):  # torch's DistBackendError and gloo's errors are RuntimeErrors
        return None
    text = str(exc)
    if any(s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "Connection refused",
                               "connectFullMesh")):
        return "closed"
    # gloo: "Timed out waiting 30000ms for recv operation"; NCCL's watchdog: "collective operation timeout".
    if "Timed out waiting" in text or "operation timeout" in text:
        return "timeout"
    return None


class RankStopped(JobError):
    """A collective failed because another rank stopped: a restarted group may well get past it."""

    restartable = True


@contextmanager
def collectives_named(info: DistInfo, heartbeat: Heartbeat) -> Iterator[None]:
    """A collective that failed because another rank stopped -> RankStopped naming that rank, from the heartbeats."""
    try:
        yield
    except RuntimeError as exc:
        kind = collective_failure(exc)
        if kind is None or info.world_size == 1:
            raise
        who = who_stopped(heartbeat, info.world_size, wait_s=3.0 if kind == "timeout" else 0.0)
        if kind == "timeout":
            limit = (f"after {info.collective_timeout_s:g} s (train.collective_timeout_s)"
                     if info.collective_timeout_s is not None else "(the launcher's collective timeout)")
            raise RankStopped(f"a collective timed out {limit} waiting for {who}: a hung or stopped worker process; "
                           "raise train.collective_timeout_s if a step can legitimately take that long") from exc
        raise RankStopped(f"the connection to {who} closed in a collective: that worker process exited or was killed "
                       "(out of memory?); its own error, if it left one, is in the job log") from exc


def rank_hosts(info: DistInfo) -> list[str]:
    """The host name of every rank, in rank order (a collective: every rank calls it). Recorded with the run, so that
    a multi-node result says which nodes made it (and a lost node can be named)."""
    here = socket.gethostname()
    if info.world_size == 1:
        return [here]
    hosts: list[str | None] = [None] * info.world_size
    dist.all_gather_object(hosts, here)
    return [str(h) for h in hosts]


def rendezvous() -> str:
    """MASTER_ADDR:MASTER_PORT of the group, as the launcher set them ("" when it set none: Ray Train's own)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{addr}:{port}" if addr else ""


def leave(info: DistInfo) -> None:
    """Wait for every rank, then close the group if this process opened it."""
    dist.barrier()
    if info.owns_group:
        dist.destroy_process_group()
