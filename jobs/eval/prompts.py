"""The texts evaluation writes itself: class prompts for zero-shot and the maps, object prompts for pointing."""

from __future__ import annotations

from filipctl.schema import EvalConfig
from jobs.eval.sets import EvalSet


def class_templates(ds: EvalSet, ev: EvalConfig) -> list[str]:
    """The set's templates (clip_benchmark's '{c}' marks the class name), else the recipe's prefix x suffix ones."""
    if ds.templates:
        return ds.templates
    return [f"{p} {{c}}. {s}".strip() for p in ev.prefixes for s in ev.suffixes]


def object_prompt(colour: str, shape: str, ev: EvalConfig) -> str:
    """The prompt naming one object of a shapes image ("a photo of a red circle."), in the recipe's first wording."""
    return f"{ev.prefixes[0]} {colour} {shape}. {ev.suffixes[0]}".strip()
