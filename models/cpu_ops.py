"""The C++ backward of the CPU late interaction (models/csrc/late_interaction_backward.cpp), when it is built.

scripts/env.sh builds it once into the environment (`<venv>/filipctl_ops/filip_cpu_ops.so`, about 10 s with g++);
every worker then loads it in under a millisecond. Where it is not built the torch path of
models/late_interaction_blocked.py runs instead: the same sums (to fp32 rounding), about 3x slower.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

LIBRARY = Path(sys.prefix) / "filipctl_ops" / "filip_cpu_ops.so"


@lru_cache(maxsize=1)
def _loaded() -> bool:
    if hasattr(torch.ops.filip_cpu, "late_interaction_backward"):
        return True
    if not LIBRARY.is_file():
        return False
    try:
        torch.ops.load_library(str(LIBRARY))
    except (OSError, RuntimeError):
        return False
    return True


def late_interaction_backward() -> Callable | None:
    """torch.ops.filip_cpu.late_interaction_backward, or None when the library is not built or does not load."""
    return torch.ops.filip_cpu.late_interaction_backward if _loaded() else None

