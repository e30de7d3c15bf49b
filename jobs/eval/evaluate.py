"""Evaluate a pretrained FILIP: zero-shot classification, retrieval, linear probe, word-patch alignment.

    python -m jobs.eval.evaluate --workdir DIR

Reads the weights named by DIR/inputs.json "pretrain" (a pretrain stage folder's model.pt, or a
state-dict file) and, when the recipe evaluates the held-out split, the data stage's index
("data"). For each set (the held-out split, then `eval.datasets` in clip_benchmark's layout) it
writes one JSON per task in clip_benchmark's result format to DIR/results/, alignment maps to
DIR/alignment/<set>/, and DIR/eval.json with every metric. The held-out split's metrics keep their
short names (i2t_R1, t2i_R1, zeroshot_top1, pointing_acc, ...); another set's are '<set>.<metric>'.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from filipctl.contract import JobError, RunDir, file_sha256, job_main, write_atomic, write_result
from filipctl.schema import Recipe
from jobs.eval import alignment
from jobs.data.index import load_index
from jobs.eval.features import FeatureFile
from jobs.eval.scoring import class_scores, classification, retrieval
from jobs.eval.sets import EvalSet, batches, held_out_set, open_benchmark
from jobs.events import emit
from jobs.eval.hard_negatives import ATTRIBUTES, FineGrained, hard_negatives
from jobs.eval.linear_probe import linear_probe
from jobs.stage_logger import StageLogger
from jobs.data.shards import ErrorLog
from jobs.data.synthetic import caption_of
from models.filip import FILIP, Encoded, build_model
from models.interaction import similarity
from models.tokenizer import tokenize


def weights_file(run_dir: RunDir) -> Path:
    """The state dict to evaluate: inputs.json 'pretrain' is a pretrain stage folder or a weights file."""
    source = run_dir.input("pretrain").root
    path = source if source.is_file() else RunDir(source).model
    if not path.is_file():
        raise JobError(f"{path} not found: run the pretrain stage first (or give filipctl eval a model.pt)")
    return path


def load_model(recipe: Recipe, weights: Path) -> FILIP:
    model = build_model(recipe.model)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # another model's weights, or not a state dict at all
        raise JobError(f"{weights} does not hold weights of this recipe's model ({type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]})") from None
    return model.eval()


@torch.no_grad()
def encode_texts(model: FILIP, texts: list[str], context_length: int, batch: int) -> Encoded:
    parts = [model.encode_text(tokenize(texts[i : i + batch], context_length)) for i in range(0, len(texts), batch)]
    return Encoded(*(torch.cat(p) for p in zip(*parts)))


def prompts_for(ds: EvalSet, recipe: Recipe) -> list[str]:
    """The templates of the set (clip_benchmark's '{c}'), else the recipe's prefix x suffix prompts."""
    if ds.templates:
        return ds.templates
    return [f"{p} {{c}}. {s}".strip() for p in recipe.eval.prefixes for s in recipe.eval.suffixes]


def probe_features(enc: Encoded, recipe: Recipe) -> Tensor:
    """[B, d] image features for the linear probe (eval.probe_features)."""
    how = recipe.eval.probe_features
    if how == "auto":
        how = "pooled" if recipe.model.interaction == "global" else "mean_tokens"
    if how == "pooled":
        return enc.pooled
    w = enc.mask.to(enc.tokens.dtype)[..., None]
    return (enc.tokens * w).sum(1) / w.sum(1).clamp_min(1)


@dataclass
class Encoder:
    """Encodes a set's splits with one model, writing features to disk, drawing maps and pointing as it goes."""

    model: FILIP
    recipe: Recipe
    scratch: Path
    maps: Path
    problems: dict[str, ErrorLog] = field(default_factory=dict)
    _prompt_cache: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    @property
    def context(self) -> int:
        return self.recipe.model.text.context_length

    def prompt(self, text: str) -> tuple[Tensor, Tensor, Tensor]:
        """(ids [L], tokens [L, d], mask [L]) of one prompt, cached."""
        if text not in self._prompt_cache:
            ids = tokenize([text], self.context)
            enc = self.model.encode_text(ids)
            self._prompt_cache[text] = (ids[0], enc.tokens[0], enc.mask[0])
        return self._prompt_cache[text]

    @torch.no_grad()
    def split(self, ds: EvalSet, split: str, texts: bool, probe: bool, maps: int = 0,
              pointing: alignment.Pointing | None = None,
              finegrained: tuple[FineGrained, FineGrained] | None = None, features: bool = True) -> dict[str, Any]:
        """Encode one split. features=False (the probe's train and val splits): only the probe's vectors are kept,
        no token features are written."""
        ev, m = self.recipe.eval, self.recipe.model
        problems = self.problems.setdefault(f"{ds.name}/{split}", ErrorLog())
        images = FeatureFile(self.scratch, f"{ds.name}-{split}-images") if features else None
        captions = FeatureFile(self.scratch, f"{ds.name}-{split}-texts") if texts else None
        owners: list[int] = []
        labels: list[int] = []
        feats: list[Tensor] = []
        grid = m.image.image_size // m.image.patch_size
        centres = alignment.patch_centres(grid, m.image.image_size)
        count = drawn = 0
        for batch in batches(ds, split, m.image.image_size, ev.batch_size, problems, keep_raw=maps):
            img = self.model.encode_image(batch.images)
            if images is not None:
                images.append(img)
            if captions is not None:
                flat = [c for caps in batch.captions for c in caps]
                owners += [count + i for i, caps in enumerate(batch.captions) for _ in caps]
                captions.append(encode_texts(self.model, flat, self.context, ev.batch_size))
            labels += batch.labels
            if probe:
                feats.append(probe_features(img, self.recipe))
            for i, pil in enumerate(batch.raw):
                self._draw(ds, img.tokens[i], pil, batch.labels[i] if batch.labels else None,
                           batch.captions[i], grid, drawn)
                drawn += 1
            if pointing is not None:
                self._point(pointing, img.tokens, batch.meta, centres)
            if finegrained is not None:
                self._finegrained(finegrained, img, batch.meta, count)
            count += len(batch.images)
            emit(f"{ds.name} {split}: {count} images", done=count)
        for f in (images, captions):
            if f is not None:
                f.close()
        if problems.count:
            for message in problems.messages:
                print(f"skipped ({ds.name} {split}): {message}", flush=True)
        if not count:
            raise JobError(f"eval set {ds.name}: no readable sample in split {split!r} ({ds.url}); "
                           f"{problems.messages[0] if problems.messages else 'the shards are empty'}")
        return {"images": images, "texts": captions, "text_image": torch.tensor(owners, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "count": count,
                "probe": torch.cat(feats).numpy() if feats else None, "skipped": problems.count}

    def _draw(self, ds: EvalSet, image_tokens: Tensor, pil: Any, label: int | None, caps: list[str], grid: int,
              index: int) -> None:
        if label is not None and ds.classnames:
            classname = ds.classnames[label]
            text = prompts_for(ds, self.recipe)[0].replace("{c}", classname)
        else:
            classname, text = None, caps[0]
        ids, tokens, mask = self.prompt(text)
        matches = alignment.patch_matches(image_tokens, tokens, mask)
        words = alignment.token_strings(ids, self.context)
        highlight = set()
        if classname:
            for word in classname.split():
                pos = alignment.word_position(ids, word, self.context)
                if pos is not None:
                    highlight.add(pos)
        folder = self.maps / ds.name
        folder.mkdir(parents=True, exist_ok=True)
        alignment.draw(pil, matches, grid, words, f"{ds.name} #{index}: “{text}”", folder / f"{index:03d}.png",
                       highlight)

    def _point(self, pointing: alignment.Pointing, tokens: Tensor, metas: list[dict[str, Any]], centres: Tensor) -> None:
        ev = self.recipe.eval
        for i, meta in enumerate(metas):
            for obj in meta.get("objects") or []:
                if not {"colour", "shape", "box"} <= set(obj):
                    continue
                text = f"{ev.prefixes[0]} {obj['colour']} {obj['shape']}. {ev.suffixes[0]}".strip()
                ids, prompt_tokens, _ = self.prompt(text)
                positions = {kind: alignment.word_position(ids, obj[kind], self.context) for kind in ("colour", "shape")}
                if None in positions.values():
                    continue
                size = self.recipe.model.image.image_size
                others = [alignment.scaled_box(o, meta, size) for o in meta["objects"] if o is not obj and "box" in o]
                pointing.add(tokens[i], prompt_tokens, positions,  # type: ignore[arg-type]
                             alignment.scaled_box(obj, meta, size), others, centres)


    def _finegrained(self, counters: tuple[FineGrained, FineGrained], img: Encoded, metas: list[dict[str, Any]],
                     first: int) -> None:
        """Each image against its true caption and the captions that differ from it in one attribute."""
        m, ev = self.recipe.model, self.recipe.eval
        for i, meta in enumerate(metas):
            objects = meta.get("objects") or []
            if not objects or not all({"colour", "shape", "position"} <= set(o) for o in objects):
                continue
            true = caption_of(objects)
            negatives = hard_negatives(objects, f"{first + i}/{true}")
            texts = [true] + [c for a in ATTRIBUTES for c in negatives[a]]
            enc = encode_texts(self.model, texts, self.context, ev.batch_size)
            one = Encoded(img.tokens[i : i + 1], img.mask[i : i + 1], img.pooled[i : i + 1])
            both = similarity(one, enc, m.interaction, m.similarity_memory_mb)  # (s^I, s^T), each [1, texts]
            for counter, direction in zip(counters, both):
                scores = direction[0].tolist()
                by_attribute, at = {}, 1
                for a in ATTRIBUTES:
                    by_attribute[a] = scores[at : at + len(negatives[a])]
                    at += len(negatives[a])
                counter.add(scores[0], by_attribute)


def result(ds: EvalSet, task: str, metrics: dict[str, Any], model: str, pretrained: str) -> dict[str, Any]:
    """One clip_benchmark result file (clip_benchmark.cli dumps exactly these keys)."""
    return {"dataset": ds.name, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": "en"}


def _flat(ds: EvalSet, metrics: dict[str, Any], rename: dict[str, str] | None = None) -> dict[str, float]:
    """MLflow metric names: the held-out split's short names, '<set>.<metric>' for the others ('@' -> '_at_')."""
    out = {}
    for k, v in metrics.items():
        if v is None:
            continue
        if ds.name == "held_out":
            out[(rename or {}).get(k, k)] = float(v)
        else:
            out[f"{ds.name}.{k.replace('@', '_at_')}"] = float(v)
    return out


HELD_OUT_NAMES = {"acc1": "zeroshot_top1", "acc5": "zeroshot_top5", "mean_per_class_recall": "zeroshot_mean_per_class_recall",
                  **{f"text_retrieval_recall@{k}": f"i2t_R{k}" for k in range(1, 1001)},
                  **{f"image_retrieval_recall@{k}": f"t2i_R{k}" for k in range(1, 1001)}}


@torch.no_grad()
def evaluate_set(enc: Encoder, ds: EvalSet, model_name: str, pretrained: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    recipe = enc.recipe
    ev, m = recipe.eval, recipe.model
    block, mem = ev.batch_size, m.similarity_memory_mb
    pointing = alignment.Pointing() if ds.objects else None
    finegrained = (FineGrained(), FineGrained("finegrained_sT")) if ds.objects else None
    probe = ds.linear_probe
    got = enc.split(ds, ds.eval_split, texts=ds.captions, probe=probe, maps=ev.alignment_images, pointing=pointing,
                    finegrained=finegrained)
    flat: dict[str, float] = {}
    results = []
    n_images = got["count"]
    if ds.captions:
        metrics = retrieval(got["images"], got["texts"], got["text_image"], m.interaction, mem, block, ev.recall_at)
        results.append(result(ds, "zeroshot_retrieval", metrics, model_name, pretrained))
        flat.update(_flat(ds, metrics, HELD_OUT_NAMES))
        flat.update(_flat(ds, {"chance_R1": 1.0 / n_images} if ds.name == "held_out" else {}, {}))
    if ds.classnames:
        templates = prompts_for(ds, recipe)
        prompts = FeatureFile(enc.scratch, f"{ds.name}-prompts")
        for template in templates:
            names = [template.replace("{c}", c) for c in ds.classnames]
            prompts.append(encode_texts(enc.model, names, enc.context, ev.batch_size))
        prompts.close()
        scores = class_scores(got["images"], prompts, len(ds.classnames), m.interaction, mem, block)
        metrics = classification(scores, got["labels"])
        results.append(result(ds, "zeroshot_classification", metrics, model_name, pretrained))
        flat.update(_flat(ds, metrics, HELD_OUT_NAMES))
        flat.update(_flat(ds, {"chance_zeroshot_top1": 1.0 / len(ds.classnames)}, {}))
        prompts.remove()
    if probe:
        train = enc.split(ds, "train", texts=False, probe=True, features=False)
        # The set's own 'val' split chooses C, unless it is the split being reported (then a share of train does).
        has_val = "val" in ds.splits and ds.eval_split != "val"
        val = enc.split(ds, "val", texts=False, probe=True, features=False) if has_val else None
        emit(f"{ds.name}: linear probe on {len(train['labels'])} train images")
        try:
            metrics = linear_probe(train["probe"], train["labels"].numpy(), got["probe"], got["labels"].numpy(),
                                   val["probe"] if val else None, val["labels"].numpy() if val else None,
                                   ev.probe_val_fraction, ev.seed)
        except ValueError as exc:
            raise JobError(f"eval set {ds.name}: linear probe: {exc}") from None
        results.append(result(ds, "linear_probe", metrics, model_name, pretrained))
        flat.update(_flat(ds, metrics, {}))
    if finegrained is not None:
        metrics = {**finegrained[0].metrics(), **finegrained[1].metrics()}
        if metrics:
            results.append(result(ds, "finegrained_retrieval", metrics, model_name, pretrained))
            flat.update(_flat(ds, metrics, {}))
    if pointing is not None:
        metrics = pointing.metrics()
        if metrics:
            results.append(result(ds, "word_patch_pointing", metrics, model_name, pretrained))
            flat.update(_flat(ds, metrics, {}))
    flat.update(_flat(ds, {"eval_pairs" if ds.name == "held_out" else "images": float(n_images),
                           "skipped_samples": float(got["skipped"])}, {}))
    got["images"].remove()
    if got["texts"] is not None:
        got["texts"].remove()
    return flat, results


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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = weights_file(run_dir)
    digest = file_sha256(weights)
    pretrained = digest[:12]  # clip_benchmark's "pretrained": which weights
    model = load_model(recipe, weights)
    sets = eval_sets(recipe, run_dir)
    scratch, results_dir, maps = run_dir.root / "features", run_dir.root / "results", run_dir.root / "alignment"
    for folder in (scratch, results_dir, maps):
        shutil.rmtree(folder, ignore_errors=True)
    results_dir.mkdir(parents=True)
    enc = Encoder(model, recipe, scratch, maps)
    logger = StageLogger(True)
    logger.tags({"filipctl.weights_sha256": digest, "filipctl.eval_sets": ",".join(s.name for s in sets)})
    metrics: dict[str, float] = {}
    for ds in sets:
        emit(f"evaluating {ds.name} ({ds.kind}, split {ds.eval_split})")
        flat, results = evaluate_set(enc, ds, recipe.name, pretrained)
        metrics.update(flat)
        for res in results:
            path = results_dir / f"{ds.name}_{pretrained}_{recipe.name}_en_{res['task']}.json"
            write_atomic(path, json.dumps(res, indent=1))
        logger.metrics(flat)
    shutil.rmtree(scratch, ignore_errors=True)
    write_result(run_dir, metrics, digests={"model.pt": digest}, skipped=int(sum(v for k, v in metrics.items() if k.endswith("skipped_samples"))))
    if logger.run_id:
        for path in sorted(results_dir.glob("*.json")):
            logger.artifact(str(path), "clip_benchmark")
        for folder in sorted(p for p in maps.glob("*") if p.is_dir()):
            for png in sorted(folder.glob("*.png")):
                logger.artifact(str(png), f"alignment/{folder.name}")
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"{k:<{width}}  {v:.4f}", flush=True)
    print(f"results: {results_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
