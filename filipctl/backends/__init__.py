"""Backends run a stage's job somewhere; the CLI talks to them only through `Backend`."""

from __future__ import annotations

from filipctl.backends.base import Backend, JobRequest, JobState
from filipctl.errors import FilipctlError

BACKENDS = ("local",)


def get_backend(name: str) -> Backend:
    if name == "local":
        from filipctl.backends.local import LocalBackend

        return LocalBackend()
    raise FilipctlError(f"--cluster {name}: unknown backend; available: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "JobRequest", "JobState", "get_backend"]
