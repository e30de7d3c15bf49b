"""Backends run a stage's job somewhere; the CLI talks to them only through `Backend`."""

from __future__ import annotations

from filipctl.backends.base import Backend, JobHandle, JobRequest
from filipctl.errors import FilipctlError
from filipctl.schema import ClusterConfig

BACKENDS = ("local", "slurm", "ray")


def get_backend(name: str, cluster: ClusterConfig | None = None) -> Backend:
    if name == "local":
        from filipctl.backends.local import LocalBackend

        return LocalBackend(cluster.local.max_parallel if cluster else None)
    if name == "slurm":
        from filipctl.backends.slurm import SlurmBackend

        return SlurmBackend(cluster.slurm if cluster else None)
    if name == "ray":
        from filipctl.backends.ray import RayBackend

        return RayBackend(cluster.ray if cluster else None)
    raise FilipctlError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


def attach(backend: str, ref: str) -> JobHandle:
    """The handle of a job recorded as (backend name, ref), e.g. in the state index."""
    return get_backend(backend).attach(ref)


__all__ = ["BACKENDS", "Backend", "JobHandle", "JobRequest", "attach", "get_backend"]
