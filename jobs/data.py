"""The data stage: make sure the recipe's dataset exists at `data.url` (generate it when it is synthetic).

    python -m jobs.data --recipe R.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jobs.events import emit
from jobs.metrics import StageLogger
from jobs.synthetic import generate, read_manifest


def prepare(recipe: dict[str, Any]) -> dict[str, Any]:
    data = recipe["data"]
    synth = data["synthetic"]
    if synth is None:
        manifest = read_manifest(data["url"])
        if manifest is None:
            raise SystemExit(f"no dataset at {data['url']} (dataset.json missing) and data.synthetic is null")
        return manifest
    total = synth["train_samples"] + synth["eval_samples"]
    step = max(1, total // 20)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            emit(f"generated {done}/{total} pairs", stage="data", done=done, total=total)

    existing = read_manifest(data["url"])
    manifest = generate(data["url"], progress=progress, **synth)
    if existing is not None and existing == manifest:
        emit(f"dataset already at {data['url']}: {manifest['counts']}", stage="data", done=total, total=total)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--workdir", required=False)
    args = parser.parse_args(argv)
    recipe = json.loads(Path(args.recipe).read_text())
    manifest = prepare(recipe)
    counts = manifest["counts"]
    StageLogger(True).metrics({"train_pairs": counts["train"], "eval_pairs": counts["eval"],
                               "classes": len(manifest["classes"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
