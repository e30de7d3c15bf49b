"""What a run was made from: git commit, the uncommitted changes as a patch, package versions.

Reads git and package metadata; imports nothing heavy. `filipctl reproduce` rebuilds the source
from (commit, patch): a worktree at the commit with the patch applied.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("filipctl", "torch", "torchvision", "deepspeed", "open_clip_torch", "timm", "mlflow", "webdataset",
            "fsspec", "s3fs", "pydantic", "typer", "numpy", "ray", "submitit")
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository: filipctl/tracking/ -> root


def git_state(root: Path = SOURCE_ROOT) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (subprocess.SubprocessError, OSError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


# Untracked files larger than this stay out of the patch (a data folder left in the tree, say); they are named.
UNTRACKED_LIMIT = 2 * 2**20


def source_patch(root: Path = SOURCE_ROOT) -> tuple[bytes, list[str]]:
    """The uncommitted changes against HEAD as one patch `git apply` takes -> (patch, untracked files left out).

    Tracked files (staged or not, binary, deleted, CRLF: bytes, never decoded) and untracked files git
    does not ignore, each up to UNTRACKED_LIMIT. b"" for a clean tree or outside git.
    """
    def git(*args: str, ok: tuple[int, ...] = (0,)) -> bytes:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60)
        if res.returncode not in ok:
            raise subprocess.CalledProcessError(res.returncode, args, res.stdout, res.stderr)
        return res.stdout

    left_out: list[str] = []
    try:
        patch = git("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff")
        for raw in git("ls-files", "--others", "--exclude-standard", "-z").split(b"\0"):
            if not raw:
                continue
            name = raw.decode("utf-8", "surrogateescape")
            path = root / name
            if path.is_file() and path.stat().st_size > UNTRACKED_LIMIT:
                left_out.append(name)
                continue
            # `diff --no-index` exits 1 when the files differ, which they do.
            patch += git("diff", "--binary", "--no-color", "--no-index", "--", "/dev/null", name, ok=(0, 1))
    except (subprocess.SubprocessError, OSError):
        return b"", []
    return patch, left_out


# The vector-instruction flags that decide which BLAS / oneDNN kernels run (and so the order of floating-point sums).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_record(cpuinfo: str | None = None) -> dict[str, str]:
    """The CPU a run computed on: its model name and the ISA flags BLAS kernels dispatch on. Reruns are bitwise
    identical on one machine type only, so `reproduce --verify` names a difference here as the cause."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return {"cpu_model": model or "unknown", "cpu_isa": " ".join(f for f in ISA_FLAGS if f in flags)}


def package_versions() -> dict[str, str]:
    """python, platform, the CPU (model, ISA flags), the thread settings a job inherits, and every installed
    distribution's version (the main ones first), read from package metadata: nothing is imported."""
    import os

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": str(os.cpu_count()),
           **cpu_record(), **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"]
        if name and name not in out:
            out[name] = dist.version
    return out
