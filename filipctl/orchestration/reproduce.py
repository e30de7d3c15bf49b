"""`filipctl reproduce` and `filipctl diff`: rebuild a tracked run from what MLflow holds, compare two runs.

What a run records (filipctl/orchestration/pipeline.py, GraphRun.track and record_data): the resolved recipe
(recipe.yaml, and as params), git commit + the uncommitted changes (source.patch, its digest as a tag),
the worker code's digest, every installed distribution with python, platform, CPU model and ISA flags and
thread settings (versions.json), the data index's digest and dataset inputs, and per stage its content key; the
pretraining stage tags its world size, torch threads and device.

reproduce: a git worktree at the recorded commit with the patch applied, the recorded recipe, run with
that code (PYTHONPATH and working directory are the worktree) into a fresh folder and the same store;
--verify compares the loss curve and eval metrics with the original's, bit for bit, and names another CPU as
the cause of a difference (reruns are bitwise identical per machine type, not across CPUs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filipctl.contract import (SYSTEM_METRICS_PREFIX, TAG_CACHED, TAG_CODE_DIGEST, TAG_DATA_DIGEST, TAG_EVALUATED,
                               TAG_KIND, TAG_PATCH_DIGEST, TAG_STAGE, TAG_WORKDIR)
from filipctl.errors import FilipctlError
from filipctl.tracking.provenance import SOURCE_ROOT

# Recipe keys that say where a run went, not what it computed.
NOT_RESULTS = ("output_dir", "description", "tracking.")
# What the pretraining job tags about where it ran: what a bitwise comparison across machines depends on.
STAGE_TAGS = ("filipctl.world_size", "filipctl.torch_threads", "filipctl.device", "filipctl.torch", "filipctl.cuda")


@dataclass
class RunRecord:
    """A pipeline run as MLflow holds it."""

    run_id: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    versions: dict[str, str]
    recipe_yaml: str
    patch: bytes
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> its MLflow run

    @property
    def commit(self) -> str:
        return self.tags.get("filipctl.git_commit", "unknown")


def _artifact(client, run_id: str, path: str) -> bytes | None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small file otherwise
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # not logged (a clean tree has no source.patch)
            return None
        return Path(local).read_bytes()


def _producer(client, stage_run):
    """The stage run whose job made the result: a cached stage's run points at it through its folder's done.json."""
    if stage_run.data.tags.get(TAG_CACHED) != "true":
        return stage_run
    try:
        done = json.loads((Path(stage_run.data.tags[TAG_WORKDIR]) / "done.json").read_text())
        return client.get_run(done["mlflow_run"])
    except Exception:  # the folder is gone or the producing run was deleted: keep what this run holds
        return stage_run


def load_record(client, run) -> RunRecord:
    from filipctl.tracking.runs import stage_runs

    if run.data.tags.get(TAG_KIND) not in ("pipeline", "variant"):
        raise FilipctlError(f"run {run.info.run_name} is a {run.data.tags.get(TAG_KIND, 'non-filipctl')} run; give a "
                            "run of one recipe (an ablation's variants each have their own id: filipctl status)")
    if TAG_EVALUATED in run.data.tags:
        raise FilipctlError(f"run {run.info.run_name} is `filipctl eval` of {run.data.tags[TAG_EVALUATED]}; give "
                            "the run that trained the model")
    rid = run.info.run_id
    recipe_yaml = _artifact(client, rid, "recipe.yaml")
    versions = _artifact(client, rid, "versions.json")
    if recipe_yaml is None or versions is None:
        raise FilipctlError(f"run {run.info.run_name} has no recipe.yaml / versions.json artifacts: it was not "
                            "made by filipctl run, or its artifacts are gone")
    stages = {c.data.tags.get(TAG_STAGE): _producer(client, c) for c in stage_runs(client, run)}
    return RunRecord(rid, run.info.run_name, dict(run.data.params), dict(run.data.tags), json.loads(versions),
                     recipe_yaml.decode(), _artifact(client, rid, "source.patch") or b"", stages)


def differences(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(key, a, b) for every key whose value differs, keys starting with `skip` left out."""
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if not k.startswith(skip) and a.get(k) != b.get(k)]


def diff(a: RunRecord, b: RunRecord) -> dict[str, list[tuple[str, Any, Any]]]:
    """What made the two runs differ, by kind: recipe keys, code, packages, data, world size."""
    def code(r: RunRecord) -> dict[str, str]:
        return {"git commit": r.commit, "uncommitted changes (patch sha256)": r.tags.get(TAG_PATCH_DIGEST, ""),
                "worker code digest (jobs/, models/)": r.tags.get(TAG_CODE_DIGEST, "")}

    def data(r: RunRecord) -> dict[str, str]:
        return {"data digest": r.tags.get(TAG_DATA_DIGEST, "(not recorded)")}

    def world(r: RunRecord) -> dict[str, str]:
        pre = r.stages.get("pretrain")
        if not pre:
            return {}
        out = {k.removeprefix("filipctl."): pre.data.tags.get(k) for k in STAGE_TAGS}
        # A stage continued at other sizes (jobs/train/segments.py): its history, as the params recorded it.
        params, k, history = pre.data.params, 0, []
        while f"segment.{k}.world_size" in params:
            history.append(f"{params[f'segment.{k}.world_size']} from step {params.get(f'segment.{k}.start_step')}")
            k += 1
        if len(history) > 1:
            out["world sizes"] = ", ".join(history)
        return out

    return {
        "recipe": differences(a.params, b.params, NOT_RESULTS),
        "code": differences(code(a), code(b)),
        "packages": differences(a.versions, b.versions),
        "data": differences(data(a), data(b)),
        "world": differences(world(a), world(b)),
    }


# -- reproduce ------------------------------------------------------------------------------------------
def _git(*args: str, cwd: Path = SOURCE_ROOT, stdin: bytes | None = None) -> str:
    res = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, input=stdin, timeout=300)
    if res.returncode:
        why = " ".join(res.stderr.decode("utf-8", "replace").split())[:300]
        raise FilipctlError(f"git {' '.join(args[:2])}: {why}")
    return res.stdout.decode("utf-8", "replace")


def rebuild_source(record: RunRecord, dest: Path) -> None:
    """A worktree of this clone at the recorded commit, with the recorded patch applied."""
    if record.commit in ("", "unknown"):
        raise FilipctlError(f"run {record.name} recorded no git commit (it ran outside a git checkout): its code "
                            "cannot be rebuilt")
    try:
        _git("cat-file", "-e", f"{record.commit}^{{commit}}")
    except FilipctlError:
        raise FilipctlError(f"commit {record.commit[:12]} of run {record.name} is not in {SOURCE_ROOT}; "
                            "fetch it (git fetch) and try again") from None
    _git("worktree", "add", "--detach", str(dest), record.commit)
    if record.patch:
        _git("apply", "--whitespace=nowarn", "-", cwd=dest, stdin=record.patch)


def remove_source(dest: Path) -> None:
    subprocess.run(["git", "-C", str(SOURCE_ROOT), "worktree", "remove", "--force", str(dest)], capture_output=True,
                   timeout=120)
    shutil.rmtree(dest, ignore_errors=True)


def rerun(record: RunRecord, source: Path, folder: Path, uri: str, env: dict[str, str] | None = None) -> str:
    """Run the recorded recipe with the rebuilt code into `folder` -> the new run's id."""
    recipe = folder / "recipe.yaml"
    recipe.write_text(record.recipe_yaml)
    from filipctl.tracking import REDACTED

    if REDACTED in record.recipe_yaml:
        raise FilipctlError(f"run {record.name}'s recipe holds redacted values (credentials are never recorded); "
                            "put them in the environment and rerun with filipctl run")
    argv = [sys.executable, "-m", "filipctl.cli", "run", str(recipe), "--json", "--set",
            f"output_dir={folder / 'runs'}", "--set", f"tracking.uri={uri}"]
    # The rebuilt code first: the working directory (python -m) and PYTHONPATH (the jobs it starts).
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [child_env.get("PYTHONPATH")])])
    res = subprocess.run(argv, cwd=source, env=child_env, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        raise FilipctlError(f"the rerun of {record.name} failed (exit {res.returncode}); its folder: {folder}")
    return json.loads(res.stdout)["run_id"]


@dataclass
class Verdict:
    identical: bool
    lines: list[str]
    cause: str | None = None  # "cpu": the runs computed on different CPUs, which explains a difference


# What provenance.cpu_record writes into versions.json.
CPU_KEYS = ("cpu_model", "cpu_isa")


def cpu_difference(recorded: dict[str, str], here: dict[str, str]) -> str | None:
    """The line that explains a rerun's difference by the CPU, or None when both ran on the same kind of CPU
    (or the original did not record its own: a run made before filipctl recorded it)."""
    changed = [k for k in CPU_KEYS if recorded.get(k) and here.get(k) and recorded[k] != here[k]]
    if not changed:
        return None
    what = (f"CPU {recorded['cpu_model']!r}" if "cpu_model" in changed else "a CPU of the same name")
    now = (f"{here['cpu_model']!r}" if "cpu_model" in changed else "one with other vector instructions")
    isa = ""
    if "cpu_isa" in changed:
        was_f, now_f = set(recorded["cpu_isa"].split()), set(here["cpu_isa"].split())
        parts = [f"{label} {' '.join(sorted(f))}" for label, f in (("only there:", was_f - now_f),
                                                                  ("only here:", now_f - was_f)) if f]
        isa = f" (instruction sets {'; '.join(parts)})" if parts else ""
    return (f"why: the original ran on {what}, this rerun on {now}{isa}. Reruns are bitwise identical on one machine "
            "type, not across CPUs: BLAS kernels and vector instructions sum floating-point numbers in another order, "
            "so the last bits differ and grow over the steps. Rerun on the original's machine type to verify bit for "
            "bit; here, compare the figures within their spread over seeds.")


def _pretrain_cpu(record: RunRecord) -> dict[str, str]:
    """The CPU the run's pretraining computed on, from its stage run's tags (rank 0's node); {} when untagged."""
    pre = record.stages.get("pretrain")
    tags = pre.data.tags if pre is not None else {}
    return {k: tags[f"filipctl.{k}"] for k in CPU_KEYS if f"filipctl.{k}" in tags}


def cpu_of(record: RunRecord) -> dict[str, str]:
    """The pretraining's CPU, else the versions.json of the command that started the run (the same machine on
    local, a login node on a cluster)."""
    return _pretrain_cpu(record) or {k: record.versions[k] for k in CPU_KEYS if k in record.versions}


def _results(metrics: dict[str, float]) -> dict[str, float]:
    """An eval run's figures without its system metrics, which differ between any two runs."""
    return {k: v for k, v in metrics.items() if not k.startswith(SYSTEM_METRICS_PREFIX)}


def _losses(client, record: RunRecord) -> dict[int, float]:
    pre = record.stages.get("pretrain")
    if pre is None:
        return {}
    return {m.step: m.value for m in client.get_metric_history(pre.info.run_id, "loss")}


def verify(client, original: RunRecord, again: RunRecord, here: dict[str, str] | None = None) -> Verdict:
    """Loss curve and eval metrics, bit for bit -> identical, or the first differing step and by how much, and why
    when the original ran on another CPU than `here` (this machine's provenance; default: the rerun's record)."""
    lines: list[str] = []
    a, b = _losses(client, original), _losses(client, again)
    if not a:
        lines.append("the original run logged no loss curve")
    for step in sorted(set(a) | set(b)):
        if a.get(step) != b.get(step):
            if step not in a or step not in b:
                lines.append(f"loss: step {step} is logged by only one of the runs")
            else:
                d = b[step] - a[step]
                lines.append(f"loss first differs at step {step}: {a[step]!r} vs {b[step]!r} (difference {d:+.3e}, "
                             f"relative {abs(d) / max(abs(a[step]), 1e-30):.2e})")
            break
    ev_a, ev_b = (_results(r.stages["eval"].data.metrics) if "eval" in r.stages else {} for r in (original, again))
    for k, x, y in differences(ev_a, ev_b):
        lines.append(f"eval {k}: {x!r} vs {y!r}")
    identical = not lines
    if identical:
        lines.append(f"identical: {len(a)} logged losses and {len(ev_a)} eval metrics, bit for bit")
        return Verdict(True, lines)
    # The rerun's own pretraining tags when its (rebuilt, possibly older) code wrote them, else this machine's.
    rerun_cpu = _pretrain_cpu(again) or (again.versions if here is None else here)
    why = cpu_difference(cpu_of(original), rerun_cpu)
    return Verdict(False, [*lines, why] if why else lines, "cpu" if why else None)


def default_folder(record: RunRecord) -> Path:
    return Path("runs") / "reproduce" / f"{record.run_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
