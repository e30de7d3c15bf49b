"""Evaluate a pretrained FILIP: zero-shot classification, retrieval, linear probe, word-patch alignment.

    python -m jobs.eval.evaluate --workdir DIR

Reads the weights named by DIR/inputs.json "pretrain" (a pretrain stage folder's model.pt, or a
state-dict file) and, when the recipe evaluates the held-out split, the data stage's index
("data"). For each set (the held-out split, then `eval.datasets` in clip_benchmark's layout) it
writes one JSON per task in clip_benchmark's result format to DIR/results/, alignment maps to
DIR/alignment/<set>/, and DIR/result.json with every metric. The held-out split's metrics keep their
short names (i2t_R1, t2i_R1, zeroshot_top1, pointing_acc, ...); another set's are '<set>.<metric>'
(jobs/eval/names.py).

Each set is read once: one pass over its evaluated split encodes the images and shows every batch
to the set's tasks (jobs/eval/tasks.py: chosen by what the set provides) and to the alignment maps;
then each task scores. Only the linear probe reads more (the train and val splits).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from filipctl.contract import JobError, RunDir, job_main, write_atomic, write_result
from filipctl.schema import Recipe
from jobs.data.index import load_index
from jobs.eval.alignment_maps import AlignmentMaps
from jobs.eval.encoder import Encoder
from jobs.eval.names import HELD_OUT, named
from jobs.eval.sets import EvalSet, held_out_set, open_benchmark
from jobs.eval.split_pass import Observer, encode_split
from jobs.eval.tasks import tasks_for
from jobs.eval.weights import load_model, weights_digest, weights_file
from jobs.events import emit
from jobs.stage_logger import StageLogger
from jobs.system_metrics import system_metrics
from models.filip import FILIP


@dataclass
class Evaluation:
    """One model evaluating sets one after another: features go to `scratch` while a set is scored, the
    alignment maps to `maps`/<set>/."""

    recipe: Recipe
    encoder: Encoder
    scratch: Path
    maps: Path

    @classmethod
    def of(cls, model: FILIP, recipe: Recipe, scratch: Path, maps: Path) -> "Evaluation":
        return cls(recipe, Encoder(model, recipe.model.text.context_length, recipe.eval.batch_size), scratch, maps)


def benchmark_name(ds: EvalSet) -> str:
    """The set as clip_benchmark's --dataset names it, and its result file's "dataset": a set in its WebDataset
    layout is wds/<name> (the file name drops the prefix); the held-out split is filipctl's own."""
    return ds.name if ds.name == HELD_OUT else f"wds/{ds.name}"


def result(ds: EvalSet, task: str, metrics: dict[str, Any], model: str, pretrained: str) -> dict[str, Any]:
    """One clip_benchmark result file (clip_benchmark.cli dumps exactly these keys)."""
    return {"dataset": benchmark_name(ds), "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en"}


def evaluate_set(run: Evaluation, ds: EvalSet, model_name: str,
                 pretrained: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """-> (the set's metrics under their names, its clip_benchmark result files)."""
    recipe = run.recipe
    image = recipe.model.image
    tasks = tasks_for(ds, run.encoder, recipe, run.scratch)
    observers: list[Observer] = [*tasks]
    if recipe.eval.alignment_images:
        observers.append(AlignmentMaps(ds, run.encoder, recipe.eval, image.image_size // image.patch_size, run.maps))
    split = encode_split(ds, ds.eval_split, run.encoder, image.image_size, observers, run.scratch,
                         keep_raw=recipe.eval.alignment_images)
    metrics: dict[str, float] = {}
    results = []
    for task in tasks:
        scores = task.score(split)
        if scores is None:  # nothing to score (no image with annotated objects)
            continue
        results.append(result(ds, task.name, scores.metrics, model_name, pretrained))
        metrics.update(named(ds.name, {**scores.metrics, **scores.extra}))
    metrics.update(named(ds.name, {"images": float(split.count), "skipped_samples": float(split.skipped)}))
    if split.images is not None:
        split.images.remove()
    return metrics, results


def eval_sets(recipe: Recipe, run_dir: RunDir) -> list[EvalSet]:
    sets = []
    if recipe.eval.held_out and recipe.data.eval is not None:
        sets.append(held_out_set(load_index(run_dir.input("data"))["eval"]))
    for d in recipe.eval.datasets:
        sets.append(open_benchmark(d.url, d.name, d.split, d.linear_probe))
    if not sets:
        raise JobError("nothing to evaluate: no held-out split (eval.held_out false or data.eval null) and "
                       "eval.datasets is empty")
    return sets


def run(recipe: Recipe, run_dir: RunDir) -> None:
    with system_metrics(recipe.tracking.system_metrics_interval_s, run_dir.root):  # this node's CPU, memory, ...
        evaluate(recipe, run_dir)


def evaluate(recipe: Recipe, run_dir: RunDir) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = weights_file(run_dir)
    digest = weights_digest(run_dir, weights)
    pretrained = digest[:12]  # clip_benchmark's "pretrained": which weights
    model = load_model(recipe, weights)
    sets = eval_sets(recipe, run_dir)
    scratch, results_dir, maps = run_dir.root / "features", run_dir.root / "results", run_dir.root / "alignment"
    for folder in (scratch, results_dir, maps):
        shutil.rmtree(folder, ignore_errors=True)
    results_dir.mkdir(parents=True)
    evaluation = Evaluation.of(model, recipe, scratch, maps)
    logger = StageLogger(True)
    logger.tags({"filipctl.weights_sha256": digest, "filipctl.eval_sets": ",".join(s.name for s in sets)})
    metrics: dict[str, float] = {}
    for ds in sets:
        emit(f"evaluating {ds.name} ({ds.kind}, split {ds.eval_split})")
        flat, results = evaluate_set(evaluation, ds, recipe.name, pretrained)
        metrics.update(flat)
        for res in results:
            path = results_dir / f"{ds.name}_{pretrained}_{recipe.name}_en_{res['task']}.json"
            write_atomic(path, json.dumps(res, indent=1))
        logger.metrics(flat, model_sha256=digest)  # also the logged model's metrics (the pretrain stage's)
    shutil.rmtree(scratch, ignore_errors=True)
    write_result(run_dir, metrics, digests={"model.pt": digest},
                 skipped=int(sum(v for k, v in metrics.items() if k.endswith("skipped_samples"))))
    if logger.run_id:
        for path in sorted(results_dir.glob("*.json")):
            logger.artifact(str(path), "clip_benchmark")
        for folder in sorted(p for p in maps.glob("*") if p.is_dir()):
            for png in sorted(folder.glob("*.png")):
                logger.artifact(str(png), f"alignment/{folder.name}")
        logger.sync()
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}", flush=True)
    print(f"results: {results_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
