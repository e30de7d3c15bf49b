"""The data stage: make sure the recipe's dataset exists at `data.url` (generate it when it is synthetic).

    python -m jobs.data --workdir DIR
"""

from __future__ import annotations

import sys
from typing import Any

from filipctl.contract import RunDir, job_main
from filipctl.schema import DataConfig, Recipe
from jobs.dataset import read_manifest, require_dataset
from jobs.events import emit
from jobs.metrics import StageLogger
from jobs.synthetic import generate


def prepare(data: DataConfig) -> dict[str, Any]:
    """The dataset's manifest; the synthetic set is generated first unless it is already there."""
    synth = data.synthetic
    if synth is None:
        return require_dataset(data)
    total = synth.train_samples + synth.eval_samples
    every = max(1, total // 20)

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            emit(f"generated {done}/{total} pairs", stage="data", done=done, total=total)

    existing = read_manifest(data.url)
    manifest = generate(data.url, synth, progress=progress)
    if existing is not None and existing == manifest:
        emit(f"dataset already at {data.url}: {manifest['counts']}", stage="data", done=total, total=total)
    return manifest


def run(recipe: Recipe, run_dir: RunDir) -> None:
    manifest = prepare(recipe.data)
    counts = manifest["counts"]
    StageLogger(True).metrics({"train_pairs": counts["train"], "eval_pairs": counts["eval"],
                               "classes": len(manifest["classes"])})


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
