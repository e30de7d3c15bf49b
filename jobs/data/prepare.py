"""The data stage: generate the synthetic set if asked, apply the paper's filters if asked, then index the shards.

    python -m jobs.data.prepare --workdir DIR         (writes DIR/data.json, the index every later stage reads)
"""

from __future__ import annotations

import json
import sys
from typing import Any

from filipctl.contract import TAG_DATA_DIGEST, JobError, RunDir, job_main, write_result
from filipctl.schema import DataConfig, Recipe
from jobs.data.index import build_index, load_index, resolve_shards, write_index
from jobs.data.report import read_report
from jobs.events import emit
from jobs.stage_logger import StageLogger
from jobs.data.synthetic import generate


def _progress(what: str, every_fraction: float = 0.05):
    def progress(done: int, total: int | None) -> None:
        step = max(1, int((total or 0) * every_fraction)) if total else 1000
        if done % step == 0 or done == total:
            emit(f"{what} {done}/{total if total else '?'}", stage="data", done=done, total=total)
    return progress


def make_synthetic(data: DataConfig) -> None:
    synth = data.synthetic
    assert synth is not None and data.eval is not None
    train_url = data.train[0].url
    if not generate(train_url, data.eval, synth, progress=_progress("generated")):
        emit(f"synthetic set already at {train_url} and {data.eval}", stage="data")


def filter_sources(data: DataConfig, logger: StageLogger) -> list[tuple[str, float]]:
    """Filter every training source into filter.output/source<i>; -> the filtered (url, weight) sources.

    A source whose filtered copy was made from the same shards with the same rules is reused.
    """
    from jobs.data.filters import REPORT, filter_shards, rules_record

    cfg = data.filter
    assert cfg is not None
    filtered: list[tuple[str, float]] = []
    for i, source in enumerate(data.train):
        out = f"{cfg.output.rstrip('/')}/source{i}"
        shards = resolve_shards(source.url)
        done = read_report(out, REPORT)
        if done and done.get("inputs") == shards and done.get("rules") == rules_record(cfg):
            emit(f"filter: {source.url} already filtered into {out}", stage="data")
            report = done
        else:
            report = filter_shards(shards, out, cfg, progress=_progress(f"filtered {source.url}"))
        emit(f"filter {source.url}: kept {report['kept']} of {report['input']}; dropped "
             + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()), stage="data")
        logger.metrics({f"filter_source{i}_kept": report["kept"], f"filter_source{i}_input": report["input"],
                        **{f"filter_source{i}_dropped_{k}": v for k, v in report["dropped"].items()}})
        logger.text(json.dumps(report, indent=1), f"filter/source{i}/{REPORT}")
        filtered.append((out, source.weight))
    return filtered


def run(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    data = recipe.data
    logger = StageLogger(True)
    if data.synthetic is not None:
        make_synthetic(data)
    sources = filter_sources(data, logger) if data.filter is not None else [(s.url, s.weight) for s in data.train]
    index = build_index(data, sources, progress=lambda url, d, t: _progress(f"indexed {url}")(d, t))
    train_pairs = sum(sum(s["counts"]) for s in index["train"])
    if train_pairs == 0:
        raise JobError(f"the training shards hold no samples: {', '.join(u for u, _ in sources)}")
    write_index(run_dir, index)
    held_out = index["eval"]
    metrics = {"train_pairs": train_pairs, "train_shards": sum(len(s["shards"]) for s in index["train"])}
    if held_out:
        metrics["eval_pairs"] = sum(held_out["counts"])
        if held_out["classnames"]:
            metrics["classes"] = len(held_out["classnames"])
    digest = load_index(run_dir)["digest"]
    logger.metrics(metrics)
    logger.tags({TAG_DATA_DIGEST: digest})
    logger.sync()
    write_result(run_dir, metrics, digests={"data.json": digest})
    emit(f"data: {metrics['train_shards']} training shards, {train_pairs} pairs"
         + (f"; held-out {metrics['eval_pairs']} pairs" if held_out else ""), stage="data")
    return index


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
