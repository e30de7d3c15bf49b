"""The C++ forward and backward of the CPU late interaction (models/csrc/), when they are built.

scripts/env.sh builds them once into the environment (`<venv>/filipctl_ops/filip_cpu_ops.so`, about 10 s with
g++); every worker then loads them in under a millisecond. Where they are not built the torch path of
models/late_interaction_blocked.py runs instead: the same values and winners (to fp32 rounding), slower (forward
about 1.6x, backward about 3x).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

LIBRARY = Path(sys.prefix) / "filipctl_ops" / "filip_cpu_ops.so"
OPS = ("late_interaction_forward", "late_interaction_backward")


def _registered() -> bool:
    return all(hasattr(torch.ops.filip_cpu, name) for name in OPS)


@lru_cache(maxsize=1)
def _loaded() -> bool:
    """True when both ops are registered (an older library with only the backward counts as not built)."""
    if _registered():
        return True
    if not LIBRARY.is_file():
        return False
    try:
        torch.ops.load_library(str(LIBRARY))
    except (OSError, RuntimeError):
        return False
    return _registered()


def late_interaction_backward() -> Callable | None:
    """torch.ops.filip_cpu.late_interaction_backward, or None when the library is not built or does not load."""
    return torch.ops.filip_cpu.late_interaction_backward if _loaded() else None


def late_interaction_forward() -> Callable | None:
    """torch.ops.filip_cpu.late_interaction_forward, or None when the library is not built or does not load."""
    return torch.ops.filip_cpu.late_interaction_forward if _loaded() else None
