"""Backends run a stage's job somewhere; the CLI talks to them only through `Backend`."""

from __future__ import annotations

from filipctl.backends.base import Backend, JobRequest, JobState
from filipctl.errors import FilipctlError
from filipctl.schema import ClusterConfig

BACKENDS = ("local", "slurm", "ray")


def get_backend(name: str, cluster: ClusterConfig | None = None) -> Backend:
    if name == "local":
        from filipctl.backends.local import LocalBackend

        return LocalBackend()
    if name == "slurm":
        from filipctl.backends.slurm import SlurmBackend

        return SlurmBackend(cluster.slurm if cluster else None)
    if name == "ray":
        from filipctl.backends.ray import RayBackend

        return RayBackend(cluster.ray if cluster else None)
    raise FilipctlError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "JobRequest", "JobState", "get_backend"]
