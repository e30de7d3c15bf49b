"""Every recipe option the schema documents is read by the code that consumes it.

An option nobody reads is worse than none: it shows in `filipctl recipe keys`, enters the run
fingerprint (changing it restarts training in a new folder) and does nothing. The check is
static: each field's name must be read as an attribute (`cfg.loader_workers`) or through
getattr somewhere in filipctl/, jobs/ or models/ outside the schema itself. A name shared by
several sections (width, seed, name) passes when any of them is read; a field with a name of
its own, as a new or forgotten option usually has, is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from filipctl.schema import CLIP_VOCAB_SIZE, Recipe, Section
from filipctl.schema_doc import schema_rows

ROOT = Path(__file__).resolve().parent.parent
CONSUMERS = ("filipctl", "jobs", "models")
NOT_CONSUMERS = {ROOT / "filipctl" / "schema.py", ROOT / "filipctl" / "schema_doc.py"}


def attributes_read() -> set[str]:
    """Every attribute name read in the consuming code: `x.name` and `getattr(x, "name")`."""
    names: set[str] = set()
    for folder in CONSUMERS:
        for path in (ROOT / folder).rglob("*.py"):
            if path in NOT_CONSUMERS:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    names.add(node.attr)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                      and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                    names.add(str(node.args[1].value))
    return names


def unread_fields(model: type[BaseModel], read: set[str]) -> list[str]:
    return [row["key"] for row in schema_rows(model) if row["type"] != "section"
            and row["key"].rsplit(".", 1)[-1] not in read]


def test_every_schema_field_is_read_by_code() -> None:
    unread = unread_fields(Recipe, attributes_read())
    assert unread == [], f"schema fields no code reads (remove them or make them real): {unread}"


def test_the_check_catches_a_field_nobody_reads() -> None:
    """The detector is not vacuous: a section with one field nobody reads is flagged, and only that field."""

    class Probe(Section):
        shuffle_buffer: int = Field(1, description="read by jobs/data/loader.py")
        prefetch_factor_nobody_reads: int = Field(2, description="read by nothing")

    class ProbeRecipe(Section):
        data: Probe = Field(default_factory=Probe)

    assert unread_fields(ProbeRecipe, attributes_read()) == ["data.prefetch_factor_nobody_reads"]


def test_vocab_size_matches_the_tokenizer_and_other_values_are_refused(tmp_path: Path) -> None:
    from filipctl.errors import RecipeError
    from filipctl.recipes import load_recipe
    from models.tokenizer import vocab_size

    assert vocab_size() == CLIP_VOCAB_SIZE
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {text: {vocab_size: 32000}}\n")
    try:
        load_recipe(recipe)
    except RecipeError as exc:
        message: Any = str(exc)
    else:
        message = None
    assert message is not None and "model.text" in message and "does not match the tokenizer" in message


def test_one_dtype_table_covers_every_precision_a_recipe_names() -> None:
    """train.precision and model.gather_dtype both map through models.precision.DTYPES."""
    from typing import get_args

    from filipctl.schema import Precision
    from models.precision import DTYPES

    assert set(DTYPES) == set(get_args(Precision))
