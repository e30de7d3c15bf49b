"""Joining the process group a backend started (torchrun, Slurm tasks, Ray Train) with DeepSpeed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from filipctl.contract import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = True  # False when a launcher (Ray Train) created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group described by the environment (torchrun-style RANK/WORLD_SIZE/MASTER_*).

    CPU-only machines use gloo and DeepSpeed's CPU accelerator; GPUs use NCCL.
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
    if not dist.is_initialized():  # Ray Train joins the group itself before our code runs
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Ranks share the cores: one thread pool each would oversubscribe them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group)


def leave(info: DistInfo) -> None:
    """Wait for every rank, then close the group if this process opened it."""
    dist.barrier()
    if info.owns_group:
        dist.destroy_process_group()
