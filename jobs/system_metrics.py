"""Each node's CPU, memory, disk, network (and GPU) while a job trains or evaluates: the MLflow run's System metrics.

A daemon thread in one process per node (pretraining's local rank 0, the eval job) samples every
`tracking.system_metrics_interval_s` seconds and appends one metrics record per sample to the node's
own spool beside the stage's (contract.node_spool), which the CLI forwards to the stage's run like
every other record. Not MLflow's SystemMetricsMonitor: that one calls the server from the job and
stops for good at its first failed call; this one never talks to MLflow, so an outage delays the
samples, it does not end them. Names are MLflow's own, `system/<node>/<metric>` (its monitor's node
id prefix), so the run page's System metrics tab shows one section per node; the step is the sample
counter and the time the sample's, as MLflow's monitor logs them.

    cpu_utilization_percentage       the whole node's CPU use since the last sample (not an instant)
    system_memory_usage_megabytes    used memory (psutil's `used`), and system_memory_usage_percentage
    disk_usage_percentage            the file system of the stage folder (checkpoints, features), and
    disk_usage_megabytes             disk_available_megabytes
    network_receive_megabytes        received since the sampler started (loopback left out), and
                                     network_transmit_megabytes
    gpu_<i>_utilization_percentage   each GPU that pynvml sees (nvidia-ml-py), when it finds one:
                                     gpu_<i>_memory_usage_megabytes / _percentage, gpu_<i>_power_usage_watts
                                     / _percentage

A sample that fails, a spool that cannot be written, psutil or pynvml missing: said once in the job
log, never a failed job.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from filipctl.contract import ENV_SPOOL, SYSTEM_METRICS_PREFIX, node_spool
from filipctl.tracking.spool import append

NODE_ENV = ("MLFLOW_SYSTEM_METRICS_NODE_ID", "SLURMD_NODENAME")  # MLflow's own override, then the scheduler's name
MIN_LAST_GAP_S = 1.0  # the sample taken as the sampler stops, when at least this long after the one before


# -- decisions (pure) -------------------------------------------------------------------------------------
def node_id(env: Mapping[str, str], hostname: str) -> str:
    """The node's name in metric keys and its spool's file name: MLFLOW_SYSTEM_METRICS_NODE_ID, else the scheduler's
    (Slurm's) name for the node, else the host name; only characters MLflow keys and file names both take."""
    name = next((env[k] for k in NODE_ENV if env.get(k)), "") or hostname.split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def keys(node: str, values: Mapping[str, float]) -> dict[str, float]:
    """MLflow's key for each metric of node `node`: system/<node>/<metric>."""
    return {f"{SYSTEM_METRICS_PREFIX}{node}/{k}": float(v) for k, v in values.items()}


def cpu_percent(before: Any, after: Any) -> float:
    """The CPU's busy share between two psutil.cpu_times() readings, in percent (psutil's own formula: iowait is idle,
    guest time is already in user time)."""
    def total(t: Any) -> float:
        return sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def idle(t: Any) -> float:
        return t.idle + getattr(t, "iowait", 0.0)

    elapsed = total(after) - total(before)
    if elapsed <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * (elapsed - (idle(after) - idle(before))) / elapsed)), 1)


def last_step(path: Path) -> int:
    """The step of the last whole record in a node's spool (an earlier attempt's samples), -1 when none: a resumed
    stage continues its run's counter, as MLflow's monitor does with resume_logging."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().split(b"\n")[:-1]  # the part after the last newline is torn
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


# -- probes: one reading of the node ----------------------------------------------------------------------
class Probes:
    """psutil's readings of this node (and pynvml's of its GPUs), as MLflow's monitors name them."""

    def __init__(self, disk: Path, say: Callable[[str], None]) -> None:
        import psutil

        self.psutil, self.disk = psutil, disk if disk.exists() else Path(os.sep)
        self.cpu = psutil.cpu_times()
        self.net0 = self._net()
        self.nvml, self.gpus = _gpus(say)

    def read(self) -> dict[str, float]:
        ps = self.psutil
        cpu = ps.cpu_times()
        out = {"cpu_utilization_percentage": cpu_percent(self.cpu, cpu)}
        self.cpu = cpu
        mem = ps.virtual_memory()
        out["system_memory_usage_megabytes"] = mem.used / 1e6
        out["system_memory_usage_percentage"] = mem.used / mem.total * 100
        disk = ps.disk_usage(str(self.disk))
        out.update(disk_usage_percentage=disk.percent, disk_usage_megabytes=disk.used / 1e6,
                   disk_available_megabytes=disk.free / 1e6)
        received, sent = self._net()
        out["network_receive_megabytes"] = (received - self.net0[0]) / 1e6
        out["network_transmit_megabytes"] = (sent - self.net0[1]) / 1e6
        for i, handle in enumerate(self.gpus):
            out.update(_gpu_reading(self.nvml, i, handle))
        return {k: round(v, 1) for k, v in out.items()}

    def _net(self) -> tuple[int, int]:
        """Bytes received and sent by the node's interfaces but loopback (ranks of one node talk over it: that is not
        the network a slow step waits for)."""
        nics = self.psutil.net_io_counters(pernic=True) or {}
        up = [c for name, c in nics.items() if not name.startswith("lo")]
        return sum(c.bytes_recv for c in up), sum(c.bytes_sent for c in up)


def _gpus(say: Callable[[str], None]) -> tuple[Any, list[Any]]:
    """(pynvml, a handle per GPU) when pynvml is installed and finds GPUs, else (None, []): no GPU is required."""
    try:
        import pynvml
    except ImportError:
        if Path("/dev/nvidiactl").exists():
            say("system metrics: no GPU metrics, pynvml is not installed (pip install nvidia-ml-py)")
        return None, []
    try:
        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - pynvml.NVMLError: no driver, no GPU here
        return None, []


def _gpu_reading(nvml: Any, i: int, handle: Any) -> dict[str, float]:
    """One GPU's reading; a value the driver does not report (power on some boards) is left out."""
    out: dict[str, float] = {}
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        out[f"gpu_{i}_memory_usage_percentage"] = mem.used / mem.total * 100
        out[f"gpu_{i}_memory_usage_megabytes"] = mem.used / 1e6
    except Exception:  # noqa: BLE001 - NVMLError
        pass
    try:
        out[f"gpu_{i}_utilization_percentage"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001
        pass
    try:
        watts = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
        out[f"gpu_{i}_power_usage_watts"] = watts
        out[f"gpu_{i}_power_usage_percentage"] = watts / (nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000) * 100
    except Exception:  # noqa: BLE001
        pass
    return out


# -- the sampler ------------------------------------------------------------------------------------------
class Sampler:
    """Samples `read()` every `interval_s` into `spool` as metrics of node `node`, on a daemon thread; `stop()`
    takes a last sample (at least MIN_LAST_GAP_S after the one before) so that a short job has one too."""

    def __init__(self, spool: Path, node: str, interval_s: float, read: Callable[[], dict[str, float]],
                 say: Callable[[str], None] = lambda msg: print(msg, flush=True)) -> None:
        self.spool, self.node, self.interval_s, self.read, self.say = spool, node, interval_s, read, say
        self.step = last_step(spool) + 1
        self.samples = 0  # taken by this sampler
        self.failed = 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the thread's sample and stop()'s last one
        self._thread = threading.Thread(target=self._loop, name="filipctl-system-metrics", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            try:
                values = keys(self.node, self.read())
                append(self.spool, {"op": "metrics", "step": self.step, "values": values})  # one O_APPEND write
            except Exception as exc:  # noqa: BLE001 - a reading or a full disk costs samples, never the job
                self.failed += 1
                if self.failed == 1:
                    self.say(f"warning: system metrics not recorded ({type(exc).__name__}: {exc}); the job goes on")
                return
            finally:
                self._last = time.monotonic()
            self.step += 1
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # Not when a reading still hangs (a dead network mount): the job's end must not wait for it.
        if not self._thread.is_alive() and time.monotonic() - self._last >= MIN_LAST_GAP_S:
            self.sample()


@contextmanager
def system_metrics(interval_s: float, stage_folder: Path, sample: bool = True) -> Iterator[Sampler | None]:
    """Sample this node while the body runs (yields the Sampler, or None when not sampling): `sample` False on every
    process of a node but one; nothing when interval_s is 0 or no spool was named (a job run by hand)."""
    spool = os.environ.get(ENV_SPOOL)
    sampler = None
    if sample and interval_s > 0 and spool:
        say = lambda msg: print(msg, flush=True)  # noqa: E731
        try:
            node = node_id(os.environ, socket.gethostname())
            path = node_spool(Path(spool), node)
            path.parent.mkdir(parents=True, exist_ok=True)
            sampler = Sampler(path, node, interval_s, Probes(stage_folder, say).read, say).start()
        except Exception as exc:  # noqa: BLE001 - psutil missing, a folder not writable from this node
            say(f"warning: system metrics not sampled ({type(exc).__name__}: {exc}); the job goes on")
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.stop()
