"""The MLflow sink: records a graph run in MLflow as the executor's transitions arrive.

It opens the runs a person reviews (an ablation's parent, a run per variant with its recipe,
versions and source patch, a run per stage under it) and, from then on, only follows: a stage's
transition becomes its runs' status, job tag, metrics (from the stage's result, never read back
from MLflow), log artifact and, for a data stage, the datasets it indexed. A stage shared by
several variants has a run under each; the first one is where its job logs, the others get copies.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import yaml

from filipctl.contract import (TAG_ABLATION, TAG_CACHED, TAG_CLUSTER, TAG_CODE_DIGEST, TAG_DATA_DIGEST, TAG_FINGERPRINT,
                               TAG_JOB, TAG_PARENT, TAG_PATCH_DIGEST, TAG_RECIPE_PATH, TAG_STAGE_KEY, TAG_VARIANT,
                               TAG_WORKDIR, job_env)
from filipctl.orchestration.graph import Graph, Node
from filipctl.orchestration.runner import Transition
from filipctl.recipes import recipe_fingerprint, recipe_to_dict
from filipctl.schema import Recipe
from filipctl.states import State
from filipctl.tracking import provenance
from filipctl.tracking.forwarder import Spool, outboxes, stage_run_of, stage_spools, write_stage_run
from filipctl.tracking.redact import redact
from filipctl.tracking.writer import Tracker


class MlflowSink:
    def __init__(self, tracker: Tracker, graph: Graph, backend: str) -> None:
        self.tracker = tracker
        self.graph = graph
        self.backend = backend
        self.top = ""  # the run a person opens: the pipeline, or the ablation
        self.variant_runs: dict[str, str] = {}
        self.stage_runs: dict[tuple[str, str], str] = {}  # (variant, node key) -> MLflow run
        self.source_notes: list[str] = []  # what the console should say about the source tree
        self.resumed: list[str] = []  # stages whose MLflow run of an earlier attempt goes on

    # -- the runs, before anything is submitted -------------------------------------------------------

    def open(self, recipes: dict[str, Recipe], recipe_path: str, label: str = "", tags: dict[str, str] | None = None,
             ablation: dict[str, Any] | None = None, to_run: set[str] | None = None) -> str:
        """The runs: a pipeline per variant (under the ablation's parent when there is one), a run per stage -> top.

        A stage to run (`to_run`, node keys) whose folder logged to a run of this store before (an attempt that
        failed, was cancelled or whose CLI died) continues that run: one run per stage, one loss curve."""
        from filipctl.orchestration.stage_keys import code_digest

        first = next(iter(recipes.values()))
        git = provenance.git_state()
        versions = provenance.package_versions()
        patch, left_out = provenance.source_patch()  # untracked new files count too: the jobs may import them
        common = {**{f"filipctl.{k}": v for k, v in git.items()}, "mlflow.source.git.commit": git["git_commit"],
                  TAG_RECIPE_PATH: recipe_path, TAG_CLUSTER: first.cluster.name, TAG_CODE_DIGEST: code_digest(),
                  TAG_PATCH_DIGEST: hashlib.sha256(patch).hexdigest()[:16] if patch else ""}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if ablation is not None:
            self.top = self.tracker.start_run(f"{first.name}-ablation-{stamp}", kind="ablation", recipe=first.name,
                                              backend=self.backend, tags={**common, **ablation.get("tags", {})},
                                              description=ablation.get("description", ""))
        for variant, recipe in recipes.items():
            keys = self.graph.variants[variant]
            name = "-".join(x for x in (recipe.name, label, variant, stamp) if x)
            workdir = self.graph.nodes[keys.get("pretrain") or list(keys.values())[-1]].run_dir.root
            run_tags = {**common, **(tags or {}), TAG_WORKDIR: str(workdir), TAG_FINGERPRINT: recipe_fingerprint(recipe)}
            if ablation is not None:
                run_tags.update({TAG_VARIANT: variant, TAG_ABLATION: self.top, TAG_PARENT: self.top,
                                 **ablation.get("variants", {}).get(variant, {})})
            as_dict = recipe_to_dict(recipe)
            run = self.tracker.start_pipeline(
                name=name, recipe=as_dict, backend=self.backend, description=recipe.description, tags=run_tags,
                recipe_yaml=yaml.safe_dump(redact(as_dict), sort_keys=False), versions=versions,
                kind="variant" if ablation is not None else "pipeline")
            self.variant_runs[variant] = run
            self.top = self.top or run
            if patch:  # `filipctl reproduce` applies it on a worktree at the commit
                self.tracker.log_bytes(run, patch, "source.patch")
            for stage_name, key in keys.items():
                node = self.graph.nodes[key]
                runs_job = to_run is not None and key in to_run and node.variants[0] == variant  # where its job logs
                earlier = stage_run_of(node.run_dir, self.tracker.uri) if runs_job else ""
                args = (stage_name, node.stage.key_metric, str(node.run_dir.root), key)
                if earlier and self.tracker.continue_stage(earlier, run, *args):
                    stage_run = earlier
                    self.resumed.append(stage_name)
                else:
                    stage_run = self.tracker.start_stage(run, stage_name, recipe.name, self.backend,
                                                         node.stage.key_metric, folder=str(node.run_dir.root),
                                                         stage_key=key)
                    self.tracker.tag(stage_run, TAG_STAGE_KEY, key)
                self.stage_runs[(variant, key)] = stage_run
                for tag, value in (ablation or {}).get("variants", {}).get(variant, {}).items():
                    self.tracker.tag(stage_run, tag, value)  # a variant's loss curves group and compare by them too
                if runs_job:
                    write_stage_run(node.run_dir, self.tracker.uri, stage_run)
        if git["git_dirty"] == "true":
            self.source_notes.append("the source tree has uncommitted changes (tagged filipctl.git_dirty=true)")
        if left_out:
            self.source_notes.append(f"{len(left_out)} untracked file(s) over {provenance.UNTRACKED_LIMIT // 2**20} "
                                     f"MB are not in source.patch: {', '.join(left_out[:5])}")
        return self.top

    def spools(self) -> list[Spool]:
        """What the forwarder sends while the graph runs: the store's outboxes (this command's, and what earlier
        commands left when the store was down or they were killed), then every stage's spool."""
        found = (s for (_, key) in self.stage_runs
                 for s in stage_spools(self.graph.nodes[key].run_dir, self.tracker.uri))  # its nodes' too
        boxes = {s.path: s for s in outboxes(self.tracker.outbox.path.parent)}
        boxes[self.tracker.outbox.path] = self.tracker.outbox
        return [*boxes.values(), *{s.path: s for s in found}.values()]

    def runs_of(self, node: Node) -> list[str]:
        return [self.stage_runs[(v, node.key)] for v in node.variants]

    def job_env(self, node: Node) -> dict[str, str]:
        """Where the stage's job reports: the first variant's run (the others get copies)."""
        return job_env(self.tracker.uri, self.runs_of(node)[0], node.run_dir.events(node.stage.name),
                       node.run_dir.spool)

    # -- following --------------------------------------------------------------------------------------

    def changed(self, t: Transition) -> None:
        runs = self.runs_of(t.node)
        if t.new is State.QUEUED and t.handle is not None:
            for run in runs:
                self.tracker.tag(run, TAG_JOB, t.handle.ref)
                self.tracker.tag(run, TAG_WORKDIR, str(t.node.run_dir.root))
                self.tracker.state.set_state(run, State.QUEUED)  # MLflow has no word for it: SCHEDULED since created
            return
        if t.new is State.RUNNING:
            for run in runs:
                self.tracker.set_state(run, State.RUNNING)
            return
        if not t.new.ended:
            return
        if t.handle is not None:  # it ran: its log goes with the run that holds its metrics
            self.tracker.log_text(runs[0], t.handle.logs(), f"logs/{t.node.stage.name}.log")
        if t.new is State.CACHED:
            for run in runs:
                self.tracker.tag(run, TAG_CACHED, "true")
                self.tracker.tag(run, TAG_WORKDIR, str(t.node.run_dir.root))
        if t.new is State.COMPLETED:
            # Its job logged the metrics on runs[0] itself (the index keeps the key metric); the others get copies.
            self.tracker.state.set_metrics(runs[0], t.metrics)
        if t.new.ok:
            for run in (runs if t.new is State.CACHED else runs[1:]):
                self.tracker.log_metrics(run, t.metrics)
            self.record_data(t.node)
        for run in runs:
            self.tracker.set_state(run, t.new)

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

    def close(self, states: dict[str, State], metrics: dict[str, dict[str, float]], interrupted: bool = False) -> None:
        """End each variant's run (and the ablation's) by how its stages ended; a variant run gets its eval metrics."""
        from filipctl.states import overall

        for variant, keys in self.graph.variants.items():
            eval_key = keys.get("eval")
            if eval_key and states[eval_key].ok:
                self.tracker.log_metrics(self.variant_runs[variant], metrics.get(eval_key, {}))
            end = overall([states[k] for k in keys.values()]) or State.CANCELLED
            self.tracker.set_state(self.variant_runs[variant], State.CANCELLED if interrupted and not end.ok else end)
        if self.top not in self.variant_runs.values():
            end = overall(list(states.values())) or State.CANCELLED
            self.tracker.set_state(self.top, State.CANCELLED if interrupted and not end.ok else end)
