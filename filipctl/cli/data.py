"""`filipctl data ...`: the data tools on their own, on any shards in img2dataset's layout.

The filter is the code the data stage runs (jobs/data/filters.py), and its options are the recipe's `data.filter`
keys, so `filipctl recipe keys` documents both; back-translation is jobs/data/backtranslate.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from filipctl.errors import FilipctlError, RecipeError

data_app = typer.Typer(help="Prepare image-caption shards (img2dataset layout): the paper's filters, "
                       "back-translated captions.", no_args_is_help=True)

InputArg = Annotated[str, typer.Argument(metavar="INPUT", help="Shards: a brace pattern (/data/cc3m/{00000..00331}.tar), "
                                         "a glob or a folder; any fsspec URL (s3://...).")]
OutputArg = Annotated[str, typer.Argument(metavar="OUTPUT", help="Folder (any fsspec URL) for the new shards and the report.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="The report as JSON on stdout.")]


def _progress(console: Console, what: str):
    """A rich progress bar and the callback the data tools report to."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                   disable=not console.is_terminal)
    task = bar.add_task(what, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _shards(url: str) -> list[str]:
    from filipctl.contract import JobError
    from jobs.data.index import resolve_shards

    try:
        return resolve_shards(url)
    except JobError as exc:
        raise FilipctlError(str(exc)) from None


@data_app.command("filter")
def filter_command(
    input_url: InputArg,
    output_url: OutputArg,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="A filter setting, as the recipe's data.filter keys: min_side, max_aspect, language (null = any), "
             "language_min_confidence, max_repeats, meaningless, samples_per_shard. Repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the FILIP paper's filters: image side < 200 px, aspect > 3, not English, meaningless or
    file-name-like captions, captions repeated more than 10 times. Writes the kept pairs as new shards and
    OUTPUT/filter_report.json (kept and dropped per rule).

    Example:  filipctl data filter '/data/cc3m/{00000..00331}.tar' /data/cc3m-filtered -s min_side=128
    """
    from pydantic import ValidationError

    from filipctl.recipes import parse_override
    from filipctl.schema import FilterConfig
    from jobs.data.filters import filter_shards

    values: dict[str, Any] = {"output": output_url}
    for text in set_ or []:
        parts, value = parse_override(text)
        values[".".join(parts)] = value
    try:
        cfg = FilterConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"--set: {problems} (the keys of data.filter: `filipctl recipe keys`)") from None
    err = Console(stderr=True)
    shards = _shards(input_url)
    bar, progress = _progress(err, f"filtering {len(shards)} shards")
    with bar:
        report = filter_shards(shards, output_url, cfg, progress=progress)
    _print_report(report, as_json, title=f"filter {input_url} -> {output_url}",
                  rows=[("input", report["input"]), *[(f"dropped: {k}", v) for k, v in report["dropped"].items()],
                        ("unreadable", report["unreadable"]), ("kept", report["kept"])])


@data_app.command("backtranslate")
def backtranslate_command(
    input_url: InputArg,
    output_url: OutputArg,
    pivot: Annotated[list[str], typer.Option(
        "--pivot", metavar="LANG=TO_DIR,BACK_DIR",
        help="A pivot language and its two local MarianMT model folders (English->LANG, LANG->English), e.g. "
             "de=models/opus-mt-en-de,models/opus-mt-de-en. Repeatable; the paper used de and ru.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Captions per translation batch.")] = 32,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", min=1, help="Pairs per new shard.")] = 10000,
    device: Annotated[str, typer.Option("--device", help="torch device for the models: cpu, cuda, cuda:1 ...")] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Add back-translated captions: each caption goes to every pivot language and back, and the results are
    appended to the sample's json "alt_captions" (the loader draws among them with data.text_augment).

    Models load from local folders only (Hugging Face transformers, MarianMT); nothing is downloaded.
    """
    from pathlib import Path

    from jobs.data.backtranslate import backtranslate_shards

    pivots: dict[str, tuple[str, str]] = {}
    for text in pivot:
        lang, sep, dirs = text.partition("=")
        to_dir, comma, back_dir = dirs.partition(",")
        if not (sep and comma and lang.strip() and to_dir and back_dir):
            raise RecipeError(f"--pivot {text!r}: expected LANG=TO_DIR,BACK_DIR, e.g. de=opus-mt-en-de,opus-mt-de-en")
        for d in (to_dir, back_dir):
            if not Path(d).is_dir():
                raise FilipctlError(f"--pivot {text}: {d} is not a model folder (config.json, weights, "
                                    "tokenizer files saved with save_pretrained)")
        pivots[lang.strip()] = (to_dir, back_dir)
    err = Console(stderr=True)
    shards = _shards(input_url)
    bar, progress = _progress(err, f"back-translating via {', '.join(pivots)}")
    try:
        with bar:
            report = backtranslate_shards(shards, output_url, pivots, batch_size, samples_per_shard, progress,
                                          device=device)
    except (OSError, ValueError) as exc:
        raise FilipctlError(f"back-translation failed: {exc}") from None
    _print_report(report, as_json, title=f"backtranslate {input_url} -> {output_url}",
                  rows=[("input", report["input"]), ("written", report["written"]),
                        ("unreadable", report["unreadable"])])


def _print_report(report: dict[str, Any], as_json: bool, title: str, rows: list[tuple[str, Any]]) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    table.add_column("")
    table.add_column("pairs", justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    out = Console()
    out.print(table)
    if report.get("shards"):
        out.print(f"shards: {report['shards']}", highlight=False, markup=False)
    for line in report.get("errors", [])[:10]:
        out.print(f"  unreadable: {line}", highlight=False, markup=False)
