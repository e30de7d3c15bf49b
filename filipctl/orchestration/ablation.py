"""`filipctl ablate`: the paper's ablation as variants of one recipe, run, then compared over seeds.

Variants: the baseline, the baseline plus each listed component, and (with two or more) all of them
together; each once per seed. A variant is the recipe with the ablation's baseline overrides, then
its components' overrides, applied in order (filipctl.schema.apply_overrides). The table, markdown and
chart that show the comparison are views in filipctl/reports/ (ablation_table, ablation_chart).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from filipctl.contract import TAG_SEED, TAG_SETTING
from filipctl.errors import RecipeError, UsageProblem
from filipctl.reports import ablation_table
from filipctl.reports.ablation_chart import chart
from filipctl.reports.ablation_rows import COLUMNS, ColumnStats, SettingRow, from_dict, to_dict
from filipctl.schema import Recipe, apply_overrides

BASELINE = "baseline"


def settings(components: list[str]) -> list[tuple[str, list[str]]]:
    """(setting name, its components): baseline, + each, + all (when there are two or more)."""
    out = [(BASELINE, [])] + [(f"+{c}", [c]) for c in components]
    if len(components) > 1:
        out.append(("+" + "+".join(components), list(components)))
    return out


def variants(recipe: Recipe, components: list[str], seeds: list[int]) -> dict[str, Recipe]:
    """Every variant's recipe, named `setting` (one seed) or `setting@seedN`."""
    known = recipe.ablation.components
    unknown = [c for c in components if c not in known]
    if unknown:
        raise UsageProblem(f"--components: unknown {', '.join(unknown)}; the recipe's components are "
                           f"{', '.join(known) or 'none (add an ablation: section)'}")
    if not components:
        raise UsageProblem(f"--components: name at least one of {', '.join(known)}")
    base = recipe.model_dump(mode="json", exclude={"ablation"})
    out: dict[str, Recipe] = {}
    for name, parts in settings(components):
        overrides: dict[str, Any] = dict(recipe.ablation.baseline)
        for c in parts:
            overrides.update(known[c])
        for seed in seeds:
            data = apply_overrides(base, {**overrides, "train.seed": seed})
            try:
                out[variant_name(name, seed, seeds)] = Recipe.model_validate(data)
            except ValueError as exc:
                raise RecipeError(f"ablation setting {name}: {exc}") from None
    return out


def variant_name(setting: str, seed: int, seeds: list[int]) -> str:
    return setting if len(seeds) == 1 else f"{setting}@seed{seed}"


def setting_of(variant: str) -> str:
    return variant.split("@seed", 1)[0]


def table_rows(components: list[str], outcomes: dict[str, tuple[bool, dict[str, float]]]) -> list[SettingRow]:
    """One row per setting: mean and std over its seeds of each column, its change against the baseline,
    and whether any of its variants failed. `outcomes`: variant -> (finished, eval metrics)."""
    rows: list[SettingRow] = []
    for name, _ in settings(components):
        runs = {v: o for v, o in outcomes.items() if setting_of(v) == name}
        ok = [m for done, m in runs.values() if done]
        base = rows[0] if rows else None  # settings() lists the baseline first
        columns = {key: _column([m[key] for m in ok if key in m], base.columns[key] if base else None)
                   for key, _ in COLUMNS}
        rows.append(SettingRow(setting=name, seeds=len(runs), finished=len(ok), failed=len(ok) < len(runs),
                               columns=columns))
    return rows


def _column(values: list[float], base: ColumnStats | None) -> ColumnStats:
    """A column's figures for one setting; `base`: the baseline's, None for the baseline itself."""
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else None
    if base is None:
        return ColumnStats(values, mean, std)
    delta = mean - base.mean if mean is not None and base.mean is not None else None
    se, p = difference_test(base.values, values)
    return ColumnStats(values, mean, std, delta, se, p)


def difference_test(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """(standard error of mean(b) - mean(a), two-sided p of Welch's t-test) over seeds; None with fewer than
    two seeds on a side. Says whether a change stands out of the seed-to-seed spread."""
    if len(a) < 2 or len(b) < 2:
        return None, None
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    if se == 0:
        return 0.0, (1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0)
    from scipy import stats  # only here: the CLI's import stays light

    return se, float(stats.ttest_ind(b, a, equal_var=False).pvalue)


def rich_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The terminal table of run_ablation's result["rows"] (their JSON shape), for the CLI."""
    return ablation_table.rich_table([from_dict(r) for r in rows], title)


def run_ablation(recipe: Recipe, recipe_path: str, components: list[str], seeds: list[int], console,
                 force: bool = False, detach: bool = False, dry_run: bool = False,
                 backend=None) -> dict[str, Any] | None:
    """Build the graph of every variant, run what is missing, record the table on the ablation's MLflow run.

    -> {"rows", "markdown", "title", "run_id", "tracking_uri", "experiment_id", "chart", "failed"}; None for
    --dry-run or --detach. "rows" in ablation.json's shape (reports.ablation_rows.to_dict), so that --json prints it as is.
    """
    from filipctl.orchestration.pipeline import GraphRun

    run = GraphRun(variants(recipe, components, seeds), console, force=force, backend=backend)
    if dry_run:
        run.describe()
        return None
    if detach and not run.backend.native_dependencies:
        raise UsageProblem(f"--detach needs a scheduler (--cluster slurm, or a Ray cluster's Jobs API address "
                           f"http://HEAD:8265): {run.backend.name} stages are started one after another by this process")
    uri = run.preflight()
    if not run.run(uri, recipe_path, detach, ablation=labels(recipe, components, seeds)):
        return None
    return record_table(run, recipe, components, seeds)


def labels(recipe: Recipe, components: list[str], seeds: list[int]) -> dict[str, Any]:
    """The ablation's MLflow parent run: its tags and description (the table's title); "variants": the tags of each
    variant's runs (its own and its stages'), by which the MLflow runs table groups them: setting, seed."""
    title = f"{recipe.name}: ablation of {', '.join(components)}" + (f" over seeds {seeds}" if len(seeds) > 1 else "")
    tags = {"filipctl.components": ",".join(components), "filipctl.seeds": ",".join(map(str, seeds))}
    by_variant = {variant_name(name, seed, seeds): {TAG_SETTING: name, TAG_SEED: str(seed)}
                  for name, _ in settings(components) for seed in seeds}
    return {"tags": tags, "description": title, "variants": by_variant}


def record_table(run, recipe: Recipe, components: list[str], seeds: list[int]) -> dict[str, Any]:
    """After the graph `run` (a pipeline.GraphRun) ran: the table of its variants, recorded on the ablation's MLflow
    run and in output_dir/ablations/<run id>/ -> run_ablation's result (here, or in the Ray job that ran the graph)."""
    import tempfile

    uri = run.tracker.uri
    title = labels(recipe, components, seeds)["description"]
    outcomes = {}
    for variant, keys in run.graph.variants.items():
        done = all(run.states[k].ok for k in keys.values())
        outcomes[variant] = (done, run.metrics.get(keys["eval"], {}) if done and "eval" in keys else {})
    rows = table_rows(components, outcomes)
    flat = [to_dict(r) for r in rows]  # ablation.json, --json and result["rows"]: the shape scripts read
    text = ablation_table.markdown(rows, title)
    with tempfile.TemporaryDirectory(prefix="filip-ablation-") as tmp:
        folder = Path(tmp)
        (folder / "ablation.md").write_text(text + "\n")
        (folder / "ablation.json").write_text(json.dumps({"title": title, "components": components, "seeds": seeds,
                                                          "variants": list(outcomes), "rows": flat}, indent=1))
        chart(rows, title, folder / "ablation.png")
        for name in ("ablation.md", "ablation.json", "ablation.png"):
            run.tracker.log_file(run.top, folder / name)
        saved = Path(recipe.output_dir).resolve() / "ablations" / run.top
        saved.mkdir(parents=True, exist_ok=True)
        for name in ("ablation.md", "ablation.json", "ablation.png"):
            (saved / name).write_bytes((folder / name).read_bytes())
    run.tracker.describe(run.top, text)
    run.flush_tracking()
    return {"rows": flat, "markdown": text, "title": title, "run_id": run.top, "tracking_uri": uri,
            "experiment_id": str(run.tracker.experiment_id or ""),
            "chart": str(saved / "ablation.png"), "failed": [r.setting for r in rows if r.failed]}
