"""The weights an eval stage evaluates: which file, its sha256, and the recipe's model holding them.

The sha256 names the weights in the result files ("pretrained") and in MLflow. It is taken once,
by whoever saw the file first: pretraining records it in its result.json; `filipctl eval` records
the digest it took of a model.pt from outside the graph in inputs.json. Only when neither did is
the file hashed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from filipctl.contract import JobError, RunDir, file_sha256, read_result
from filipctl.schema import Recipe
from models.filip import FILIP, build_model

_SHA256 = re.compile(r"[0-9a-f]{64}")


def weights_file(run_dir: RunDir) -> Path:
    """The state dict to evaluate: inputs.json 'pretrain' is a pretrain stage folder or a weights file."""
    source = run_dir.input("pretrain").root
    path = source if source.is_file() else RunDir(source).model
    if not path.is_file():
        raise JobError(f"{path} not found: run the pretrain stage first (or give filipctl eval a model.pt)")
    return path


def weights_digest(run_dir: RunDir, weights: Path) -> str:
    """Hex sha256 of `weights`: as recorded by the CLI or the pretrain stage, else hashed now."""
    known = run_dir.input_digest("pretrain")
    source = run_dir.input("pretrain").root  # this very folder when it has no inputs.json: no pretrain stage
    if known is None and source.is_dir() and run_dir.inputs_file.is_file():
        known = ((read_result(RunDir(source)) or {}).get("digests") or {}).get("model.pt")
    if isinstance(known, str) and _SHA256.fullmatch(known.removeprefix("sha256:")):
        return known.removeprefix("sha256:")
    return file_sha256(weights)


def load_model(recipe: Recipe, weights: Path) -> FILIP:
    model = build_model(recipe.model)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # another model's weights, or not a state dict at all
        raise JobError(f"{weights} does not hold weights of this recipe's model ({type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]})") from None
    return model.eval()
