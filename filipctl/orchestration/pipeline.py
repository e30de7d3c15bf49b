"""Run a stage graph through a backend, tracked in MLflow, with progress on the console.

`filipctl run` is the graph of one variant; `filipctl ablate` the graph of several (filipctl/orchestration/graph.py).

    preflight  the tracking store answers, the run folders can be made, the scheduler accepts each job
    track      the stage folders (recipe.json, inputs.json), the MLflow runs: one per variant, one per
               stage of each variant, under an ablation's parent when there are several
    execute    stages done before (same key) are reused; the others are queued all at once where a
               scheduler holds the dependencies (Slurm afterok), else started one after another
    follow     wait for the jobs, drawing their progress events; record how each ended; a failed stage
               takes only the stages that depend on it down with it
    abandon    on Ctrl-C (or SIGTERM), cancel what has not finished and record it
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from filipctl import tracking
from filipctl.tracking import provenance
from filipctl.backends import Backend, JobRequest, JobState, get_backend
from filipctl.contract import (TAG_ABLATION, TAG_CACHED, TAG_CLUSTER, TAG_CODE_DIGEST, TAG_DATA_DIGEST,
                               TAG_FINGERPRINT, TAG_JOB, TAG_PARENT, TAG_PATCH_DIGEST, TAG_RECIPE_PATH, TAG_STAGE_KEY,
                               TAG_VARIANT, TAG_WORKDIR, job_env, write_atomic)
from filipctl.errors import FilipctlError
from filipctl.orchestration.graph import Graph, Node, build_graph, code_digest
from filipctl.recipes import recipe_fingerprint, recipe_to_dict
from filipctl.schema import Recipe

POLL_S = 0.5


class StageFailed(FilipctlError):
    pass


@dataclass
class Outcome:
    state: str  # completed, cached, failed, cancelled, not run
    metrics: dict[str, float] = field(default_factory=dict)
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("completed", "cached")


@dataclass
class PipelineResult:
    parent_run_id: str
    tracking_uri: str
    workdir: Path
    metrics: dict[str, dict[str, float]]
    duration_s: float


class _EventTail:
    """Reads the JSON lines a job appends to its events file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        # Keep a half-written last line for the next read.
        complete, _, _rest = chunk.rpartition("\n")
        if not complete:
            return []
        self.offset += len(complete) + 1
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _tail(text: str, n: int = 25) -> str:
    """What to quote of a failed job's log: its own `error:` lines when it said why, else the last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error: ")]
    return "\n".join("    " + ln for ln in (said[-5:] or lines[-n:]))


def _absolute(url: str) -> str:
    """A local path (or pattern) made absolute, ~ expanded; URLs with a scheme stay as they are."""
    if "://" in url:
        return url
    path = Path(url).expanduser()
    return str(path) if path.is_absolute() else str(path.resolve())


def align_to_cluster(recipe: Recipe, console: Console) -> Recipe:
    """Make the recipe mean the same wherever its jobs run.

    Relative data paths become absolute (jobs may start in another directory: Ray workers do);
    on a cluster the profile decides the world size, and the recipe follows so that the
    global batch and the LR scaling are honest.
    """
    data = recipe.data
    update: dict[str, Any] = {"train": [s.model_copy(update={"url": _absolute(s.url)}) for s in data.train]}
    if data.eval is not None:
        update["eval"] = _absolute(data.eval)
    if data.filter is not None:
        update["filter"] = data.filter.model_copy(update={"output": _absolute(data.filter.output)})
    sets = [d.model_copy(update={"url": _absolute(d.url)}) for d in recipe.eval.datasets]
    recipe = recipe.model_copy(update={"data": data.model_copy(update=update),
                                       "eval": recipe.eval.model_copy(update={"datasets": sets}),
                                       "output_dir": str(Path(recipe.output_dir).resolve())})
    if recipe.cluster.backend == "local":
        return recipe
    profile = getattr(recipe.cluster, recipe.cluster.backend)
    world = profile.world_size
    if recipe.train.workers == world:
        return recipe
    console.print(f"note: train.workers {recipe.train.workers} -> {world} (cluster profile {recipe.cluster.name}); "
                  f"global batch {recipe.train.micro_batch_size * world}", highlight=False, markup=False)
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"workers": world})})


def _check_writable(folder: Path) -> None:
    """The folder can be made: its nearest existing ancestor is a folder this process may write to."""
    import os

    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FilipctlError(f"cannot create the run folder {folder}: {parent} is not a writable folder; "
                            "set output_dir to one")


def _reusable(node: Node, deps: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """A done record is reused when its key matches, it was made from exactly the dependency results
    that stand now (none of them reran since), and, for the data stage, its shards are unchanged."""
    record = node.done()
    if record is None or "id" not in record:
        return None
    for key, dep in deps.items():
        if dep is None or record.get("inputs", {}).get(key) != dep["id"]:
            return None
    if node.stage.name == "data" and not node.data_unchanged():
        return None
    return record


def _request(backend: Backend, node: Node, after: tuple[str, ...] = (), env: dict[str, str] | None = None) -> JobRequest:
    return JobRequest(node.stage, node.run_dir, env=env or {}, after=after if backend.native_dependencies else ())


class GraphRun:
    """One `filipctl run` or `filipctl ablate`: its graph, backend, MLflow runs and the jobs submitted so far."""

    def __init__(self, variants: dict[str, Recipe], console: Console, force: bool = False,
                 graph: Graph | None = None, label: str = "", tags: dict[str, str] | None = None) -> None:
        self.console = console
        self.recipes = {v: align_to_cluster(r, console) for v, r in variants.items()}
        first = next(iter(self.recipes.values()))
        self.first = first
        self.backend = get_backend(first.cluster.backend, first.cluster)
        self.graph: Graph = graph or build_graph(self.recipes, Path(first.output_dir))
        self.label = label  # in the pipeline run's name: "eval" for `filipctl eval`
        self.tags = tags or {}
        self.force = force
        self.tracker: tracking.Tracker | None = None
        self.top = ""  # the MLflow run a person opens: the pipeline, or the ablation
        self.variant_runs: dict[str, str] = {}
        self.stage_runs: dict[tuple[str, str], str] = {}  # (variant, node key) -> MLflow run
        self.submitted: dict[str, str] = {}  # node key -> job id
        self.outcomes: dict[str, Outcome] = {}
        self.done_ids: dict[str, str] = {}  # node key -> id of its done record (reused or written now)
        self._cache: dict[str, dict[str, Any] | None] = {}

    # -- before anything is written ---------------------------------------------------------------

    def cached(self, node: Node) -> dict[str, Any] | None:
        """The done record to reuse for `node`, or None when it must run (decided once per node)."""
        if node.key not in self._cache:
            self._cache[node.key] = None if self.force else _reusable(node, {k: self.cached(self.graph.nodes[k])
                                                                              for k in node.deps.values()})
        return self._cache[node.key]

    def to_run(self) -> list[Node]:
        return [n for n in self.graph.nodes.values() if self.cached(n) is None]

    def preflight(self) -> str:
        """Every check that can fail without leaving anything behind -> the tracking URI."""
        uri = tracking.resolve_uri(self.first.tracking.uri)
        tracking.check_store(uri, self.first.tracking.timeout_s, must_exist=False)
        _check_writable(Path(self.first.output_dir))
        # Ask the scheduler first: a request it can never satisfy fails here, with nothing queued or tracked.
        for node in self.to_run():
            self.backend.validate(_request(self.backend, node, after=tuple(f"<{d} job id>" for d in node.stage.after)))
        return uri

    def describe(self) -> None:
        """The graph for --dry-run: each stage, its key, cached or to run, and what would be submitted."""
        console = self.console
        console.print(f"dry run on {self.backend.name} (profile {self.first.cluster.name}): "
                      f"{len(self.graph.nodes)} stages, {len(self.to_run())} to run; nothing submitted",
                      highlight=False, markup=False)
        for node in self.graph.nodes.values():
            state = "cached" if self.cached(node) else "to run"
            after = f" after {', '.join(node.stage.after)}" if node.stage.after else ""
            users = ", ".join(v or "(run)" for v in node.variants)
            console.print(f"\n# {node.stage.name} {node.key}  {state}{after}  [{users}]", highlight=False,
                          markup=False)
            console.print(f"  folder {node.run_dir.root}", highlight=False, markup=False)
            if state == "to run":
                request = _request(self.backend, node, after=tuple(f"<{d} job id>" for d in node.stage.after))
                console.print(self.backend.describe(request), highlight=False, markup=False, soft_wrap=True)

    # -- the stage folders and MLflow ---------------------------------------------------------------

    def prepare_folders(self) -> None:
        try:
            for node in self.to_run():
                if self.force and node.run_dir.root.exists():
                    shutil.rmtree(node.run_dir.root)
                node.run_dir.logs.mkdir(parents=True, exist_ok=True)
                node.run_dir.done.unlink(missing_ok=True)
                write_atomic(node.run_dir.recipe, json.dumps(recipe_to_dict(node.recipe), indent=1))
                inputs = {**node.external,
                          **{name: str(self.graph.nodes[key].run_dir.root) for name, key in node.deps.items()}}
                write_atomic(node.run_dir.inputs_file, json.dumps(inputs, indent=1))
        except OSError as exc:
            raise FilipctlError(f"cannot write the run folder under {self.first.output_dir}: "
                                f"{exc.strerror or exc}; set output_dir to a writable folder") from None

    def track(self, uri: str, recipe_path: str, ablation: dict[str, Any] | None = None) -> None:
        """The MLflow runs: a pipeline per variant (under the ablation's parent when there is one), a run per stage."""
        self.tracker = tracking.Tracker(uri, self.first.tracking.experiment)
        git = provenance.git_state()
        versions = provenance.package_versions()
        patch, left_out = provenance.source_patch()  # untracked new files count too: the jobs may import them
        common = {**{f"filipctl.{k}": v for k, v in git.items()}, "mlflow.source.git.commit": git["git_commit"],
                  TAG_RECIPE_PATH: recipe_path, TAG_CLUSTER: self.first.cluster.name, TAG_CODE_DIGEST: code_digest(),
                  TAG_PATCH_DIGEST: hashlib.sha256(patch).hexdigest()[:16] if patch else ""}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if ablation is not None:
            self.top = self.tracker.start_run(f"{self.first.name}-ablation-{stamp}", kind="ablation",
                                              recipe=self.first.name, backend=self.backend.name,
                                              tags={**common, **ablation.get("tags", {})},
                                              description=ablation.get("description", ""))
        for variant, recipe in self.recipes.items():
            keys = self.graph.variants[variant]
            name = "-".join(x for x in (recipe.name, self.label, variant, stamp) if x)
            workdir = self.graph.nodes[keys.get("pretrain") or list(keys.values())[-1]].run_dir.root
            tags = {**common, **self.tags, TAG_WORKDIR: str(workdir), TAG_FINGERPRINT: recipe_fingerprint(recipe)}
            if ablation is not None:
                tags.update({TAG_VARIANT: variant, TAG_ABLATION: self.top, TAG_PARENT: self.top})
            run = self.tracker.start_pipeline(
                name=name, recipe=recipe_to_dict(recipe), backend=self.backend.name, description=recipe.description,
                tags=tags, recipe_yaml=yaml.safe_dump(tracking.redact(recipe_to_dict(recipe)), sort_keys=False),
                versions=versions, kind="variant" if ablation is not None else "pipeline")
            self.variant_runs[variant] = run
            self.top = self.top or run
            if patch:  # `filipctl reproduce` applies it on a worktree at the commit
                self.tracker.log_bytes(run, patch, "source.patch")
            for stage_name, key in keys.items():
                node = self.graph.nodes[key]
                self.stage_runs[(variant, key)] = self.tracker.start_stage(run, stage_name, recipe.name,
                                                                           self.backend.name, node.stage.key_metric)
                self.tracker.tag(self.stage_runs[(variant, key)], TAG_STAGE_KEY, key)
        label = "ablation" if ablation is not None else "run"
        self.console.print(f"{label} [bold]{escape(self.first.name)}[/] on [bold]{self.backend.name}[/]: "
                           f"{len(self.graph.nodes)} stages, {len(self.to_run())} to run  mlflow run {self.top}",
                           highlight=False)
        if git["git_dirty"] == "true":
            self.console.print("[yellow]note:[/] the source tree has uncommitted changes (tagged filipctl.git_dirty=true)")
        if left_out:
            self.console.print(f"[yellow]note:[/] {len(left_out)} untracked file(s) over "
                               f"{provenance.UNTRACKED_LIMIT // 2**20} MB are not in source.patch: "
                               f"{escape(', '.join(left_out[:5]))}")

    def _runs_of(self, node: Node) -> list[str]:
        return [self.stage_runs[(v, node.key)] for v in node.variants]

    def reuse(self, node: Node, record: dict[str, Any]) -> None:
        """A stage done before under the same key: recorded as cached, with the metrics it had."""
        for run in self._runs_of(node):
            self.tracker.tag(run, TAG_CACHED, "true")
            self.tracker.tag(run, TAG_WORKDIR, str(node.run_dir.root))
            self.tracker.log_metrics(run, record.get("metrics", {}))
            self.tracker.end(run, "FINISHED")
        self.outcomes[node.key] = Outcome("cached", record.get("metrics", {}))
        self.done_ids[node.key] = record["id"]
        self.record_data(node)
        self.console.print(f"  [{node.stage.name}] cached: {node.name} (done {record.get('finished', '?')})",
                           highlight=False, markup=False)

    # -- jobs ---------------------------------------------------------------------------------------

    def submit(self, node: Node) -> None:
        events = node.run_dir.events(node.stage.name)
        events.unlink(missing_ok=True)
        after = tuple(self.submitted[k] for k in node.deps.values() if k in self.submitted and k != node.key
                      and self.graph.nodes[k].stage.name in node.stage.after)
        runs = self._runs_of(node)
        env = job_env(self.tracker.uri, runs[0], events)  # the first variant's run logs; the others get copies
        self.submitted[node.key] = self.backend.submit(_request(self.backend, node, after, env))
        for run in runs:
            self.tracker.tag(run, TAG_JOB, self.submitted[node.key])
            self.tracker.tag(run, TAG_WORKDIR, str(node.run_dir.root))

    def finish(self, node: Node, state: JobState) -> None:
        """Record how a job ended, on every variant's run of it; a completed stage leaves its done.json."""
        job_id, runs = self.submitted[node.key], self._runs_of(node)
        log = self.backend.logs(job_id)
        self.tracker.log_text(runs[0], log, f"logs/{node.stage.name}.log")
        if state is JobState.COMPLETED:
            metrics = self.tracker.metrics(runs[0])
            for run in runs[1:]:
                self.tracker.log_metrics(run, metrics)
            for run in runs:
                self.tracker.end(run, "FINISHED")
            self.done_ids[node.key] = uuid.uuid4().hex
            write_atomic(node.run_dir.done, json.dumps({
                "key": node.key, "id": self.done_ids[node.key], "stage": node.stage.name, "metrics": metrics,
                "inputs": {k: self.done_ids[k] for k in node.deps.values()}, "mlflow_run": runs[0],
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
            self.outcomes[node.key] = Outcome("completed", metrics)
            self.record_data(node)
            return
        for run in runs:
            self.tracker.end(run, "KILLED" if state is JobState.CANCELLED else "FAILED")
        self.outcomes[node.key] = Outcome("cancelled" if state is JobState.CANCELLED else "failed", log=log)
        for dependent in self.graph.dependents(node.key):  # only what reads from it goes down with it
            self.skip(dependent)

    def record_data(self, node: Node) -> None:
        """What a data stage indexed, on each of its variants' runs: MLflow dataset inputs (train, eval) named by
        their URL with the content digest of every shard (jobs/data/index.py), and the digest as a tag."""
        if node.stage.name != "data":
            return
        try:
            index = json.loads(node.run_dir.data_index.read_text())
        except (OSError, ValueError):
            return
        if "digest" not in index:  # an index written before digests were kept
            return
        splits = [("train", e) for e in index.get("train", [])] + ([("eval", index["eval"])] if index.get("eval") else [])
        for variant in node.variants:
            run = self.variant_runs[variant]
            self.tracker.tag(run, TAG_DATA_DIGEST, index["digest"])
            for context, entry in splits:
                one = hashlib.sha256(json.dumps(entry.get("digests") or entry["shards"]).encode()).hexdigest()
                self.tracker.log_dataset(run, entry["url"], entry["url"], one, context,
                                         {"shards": len(entry["shards"]), "samples": sum(entry.get("counts") or [])})

    def skip(self, node: Node) -> None:
        if node.key in self.outcomes:
            return
        if node.key in self.submitted:
            self.backend.cancel(self.submitted[node.key])
        for run in self._runs_of(node):
            self.tracker.end(run, "KILLED")
        self.outcomes[node.key] = Outcome("not run")

    def follow(self, nodes: list[Node]) -> None:
        """Poll the jobs of `nodes` until each has ended (or was skipped), drawing their progress."""
        console = self.console
        columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        pending = {n.key: n for n in nodes if n.key in self.submitted}
        running: set[str] = set()
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            tasks = {k: progress.add_task(n.stage.name, total=None, note="queued") for k, n in pending.items()}
            tails = {k: _EventTail(n.run_dir.events(n.stage.name)) for k, n in pending.items()}
            while pending:
                for key, node in list(pending.items()):
                    if key in self.outcomes:  # skipped: a stage it depends on failed
                        progress.update(tasks[key], note="not run")
                        del pending[key]
                        continue
                    task = tasks[key]
                    for ev in tails[key].read():
                        if not console.is_terminal:
                            console.print(f"  [{node.stage.name}] {ev['message']}", highlight=False, markup=False,
                                          soft_wrap=True)
                        progress.update(task, total=ev.get("total", progress.tasks[task].total),
                                        completed=ev.get("done", progress.tasks[task].completed),
                                        note=ev["message"][-60:])
                    state = self.backend.status(self.submitted[key])
                    if state is JobState.RUNNING and key not in running:
                        running.add(key)
                        for run in self._runs_of(node):
                            self.tracker.running(run)
                    if state.done:
                        progress.update(task, note=state.value.lower())
                        del pending[key]
                        self.finish(node, state)
                if pending:
                    time.sleep(POLL_S)

    def execute(self, detach: bool = False) -> bool:
        """Run what is not cached -> False when detached (nothing followed)."""
        order = list(self.graph.nodes.values())
        for node in order:
            record = self.cached(node)
            if record is not None:
                self.reuse(node, record)
        if self.backend.native_dependencies:
            todo = [n for n in order if n.key not in self.outcomes]
            try:
                for node in todo:
                    self.submit(node)
            except FilipctlError:
                self.abandon()
                raise
            self.console.print("queued: " + ", ".join(f"{self.graph.nodes[k].stage.name} = job {j.split('@')[0]}"
                                                      for k, j in self.submitted.items()), highlight=False)
            if detach:
                return False
            self.follow(todo)
            return True
        for node in order:
            if node.key in self.outcomes:
                continue
            if not all(self.outcomes.get(k, Outcome("not run")).ok for k in node.deps.values()):
                self.skip(node)
                continue
            self.submit(node)
            self.follow([node])
        return True

    def abandon(self) -> list[str]:
        """Cancel every stage that has not ended; record them as killed -> their names."""
        left = [n for n in self.graph.nodes.values() if n.key not in self.outcomes]
        for node in left:
            self.skip(node)
        return [n.stage.name for n in left]

    def close(self, interrupted: bool = False) -> None:
        """End each variant's run (and the ablation's) by how its stages ended; a variant run gets its eval metrics."""
        for variant, keys in self.graph.variants.items():
            outcomes = [self.outcomes.get(k, Outcome("not run")) for k in keys.values()]
            eval_key = keys.get("eval")
            if eval_key and self.outcomes.get(eval_key, Outcome("")).ok:
                self.tracker.log_metrics(self.variant_runs[variant], self.outcomes[eval_key].metrics)
            state = "FINISHED" if all(o.ok for o in outcomes) else (
                "KILLED" if interrupted or any(o.state == "cancelled" for o in outcomes) else "FAILED")
            self.tracker.end(self.variant_runs[variant], state)
        if self.top not in self.variant_runs.values():
            states = [self.outcomes.get(k, Outcome("")).ok for k in self.graph.nodes]
            self.tracker.end(self.top, "FINISHED" if all(states) else ("KILLED" if interrupted else "FAILED"))

    def failure(self) -> StageFailed | None:
        """The first failed stage, as the one-line story a person reads (with its log's own words)."""
        for node in self.graph.nodes.values():
            outcome = self.outcomes.get(node.key)
            if outcome and outcome.state in ("failed", "cancelled"):
                dependents = [d.stage.name for d in self.graph.dependents(node.key)]
                what = "cancelled" if self.backend.native_dependencies else "not run"
                verb = "failed" if outcome.state == "failed" else "cancelled"
                return StageFailed(f"stage {node.stage.name} {verb}; {what}: {', '.join(dependents) or 'nothing'}. "
                                   f"Last lines of its log:\n{_tail(outcome.log)}")
        return None


def run_graph(run: GraphRun, uri: str, recipe_path: str, detach: bool,
              ablation: dict[str, Any] | None = None) -> bool:
    """Track and execute a prepared graph -> False when detached. Ctrl-C cancels what has not finished."""
    run.prepare_folders()
    run.track(uri, recipe_path, ablation)
    try:
        if not run.execute(detach):
            run.console.print(f"detached. Follow with: filipctl status   filipctl logs {run.top[:8]}   "
                              f"filipctl cancel {run.top[:8]}", highlight=False)
            return False
    except KeyboardInterrupt:
        left = run.abandon()
        run.close(interrupted=True)
        raise StageFailed(f"interrupted: cancelled {', '.join(left) or 'nothing'}; a rerun resumes from the "
                          "latest checkpoint and reuses the stages that finished") from None
    run.close()
    return True


def run_pipeline(recipe: Recipe, recipe_path: str, console: Console, fresh: bool = False,
                 detach: bool = False) -> PipelineResult:
    """`filipctl run`: the graph of one variant."""
    t0 = time.time()
    run = GraphRun({"": recipe}, console, force=fresh)
    uri = run.preflight()
    followed = run_graph(run, uri, recipe_path, detach)
    keys = run.graph.variants[""]
    workdir = run.graph.nodes[keys["pretrain"]].run_dir.root
    if not followed:
        return PipelineResult(run.top, uri, workdir, {}, time.time() - t0)
    failed = run.failure()
    if failed:
        raise failed
    metrics = {stage: run.outcomes[key].metrics for stage, key in keys.items()}
    return PipelineResult(run.top, uri, workdir, metrics, time.time() - t0)


def dry_run(recipe: Recipe, console: Console) -> None:
    """Print the graph and what each stage would submit; submit and write nothing."""
    GraphRun({"": recipe}, console).describe()
