"""`filipctl recipe ...`: check and inspect recipes without running anything (validate, show, keys)."""

from __future__ import annotations

import json
import sys

import typer

from filipctl.cli import consoles
from filipctl.cli.options import JsonOpt, RecipeArg, SetOpt, load

recipe_app = typer.Typer(help="Check and inspect recipes without running anything.", no_args_is_help=True)


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe (with its extends: chain and --set overrides) against the schema."""
    from rich.markup import escape

    r = load(recipe, set_)
    consoles.out.print(f"[green]ok[/] {escape(recipe)}: recipe {escape(repr(r.name))}, {r.train.steps} steps, "
                       f"global batch {r.train.global_batch}, {r.model.interaction} interaction", highlight=False)
    if r.description:
        consoles.out.print(r.description, highlight=False, markup=False)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the fully resolved recipe (defaults, extends: and --set applied)."""
    from filipctl.recipes import recipe_to_dict, recipe_to_yaml

    r = load(recipe, set_)
    if as_json:
        print(json.dumps(recipe_to_dict(r), indent=1))
    else:
        sys.stdout.write(recipe_to_yaml(r))


@recipe_app.command("keys")
def recipe_keys(as_json: JsonOpt = False) -> None:
    """Every recipe key with its type, default and meaning (generated from the schema)."""
    from filipctl.schema_doc import schema_rows

    rows = schema_rows()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    t = Table(header_style="bold", show_lines=False)
    for col in ("key", "type", "default", "meaning"):
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(row["key"], row["type"], row["default"], row["doc"])
    consoles.out.print(t)
