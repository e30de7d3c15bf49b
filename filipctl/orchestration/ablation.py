"""`filipctl ablate`: the paper's ablation as variants of one recipe, and its table, markdown and chart.

Variants: the baseline, the baseline plus each listed component, and (with two or more) all of them
together; each once per seed. A variant is the recipe with the ablation's baseline overrides, then
its components' overrides, applied in order (filipctl.schema.apply_overrides).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from filipctl.errors import RecipeError, UsageProblem
from filipctl.schema import Recipe, apply_overrides

# The paper's columns: MSCOCO-style retrieval R@1/R@5 both ways and zero-shot top-1, here on the held-out split;
# then what late interaction is meant to improve: retrieval against captions that differ in one attribute
# (jobs/eval/hard_negatives.py) and word-patch pointing accuracy (jobs/eval/alignment.py).
COLUMNS = (("i2t_R1", "I2T R@1"), ("i2t_R5", "I2T R@5"), ("t2i_R1", "T2I R@1"), ("t2i_R5", "T2I R@5"),
           ("zeroshot_top1", "zero-shot top-1"), ("finegrained_R1", "fine-grained R@1"), ("pointing_acc", "pointing"))
BASELINE = "baseline"
SIGNIFICANT = 0.05  # Welch's t-test over seeds: a change marked * is unlikely to be seed noise alone


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
                out[name if len(seeds) == 1 else f"{name}@seed{seed}"] = Recipe.model_validate(data)
            except ValueError as exc:
                raise RecipeError(f"ablation setting {name}: {exc}") from None
    return out


def setting_of(variant: str) -> str:
    return variant.split("@seed", 1)[0]


def table_rows(components: list[str], outcomes: dict[str, tuple[bool, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per setting: mean and std over its seeds of each column, its change against the baseline,
    and whether any of its variants failed. `outcomes`: variant -> (finished, eval metrics)."""
    rows = []
    for name, _ in settings(components):
        runs = {v: o for v, o in outcomes.items() if setting_of(v) == name}
        ok = [m for done, m in runs.values() if done]
        row: dict[str, Any] = {"setting": name, "seeds": len(runs), "finished": len(ok),
                               "failed": len(ok) < len(runs)}
        for key, _label in COLUMNS:
            values = [m[key] for m in ok if key in m]
            row[f"{key}_values"] = values
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key, _ in COLUMNS:
            both = row[key] is not None and base[key] is not None
            row[f"{key}_delta"] = (row[key] - base[key]) if both and row is not base else None
            row[f"{key}_delta_se"], row[f"{key}_p"] = (
                difference_test(base[f"{key}_values"], row[f"{key}_values"]) if row is not base else (None, None))
    return rows


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


def _cell(row: dict[str, Any], key: str) -> str:
    if row[key] is None:
        return "failed" if row["failed"] else "-"
    text = f"{100 * row[key]:.1f}"
    if row[f"{key}_std"] is not None:
        text += f" ± {100 * row[f'{key}_std']:.1f}"
    if row[f"{key}_delta"] is not None:
        se, p = row[f"{key}_delta_se"], row[f"{key}_p"]
        spread = f" ± {100 * se:.1f}" if se is not None else ""
        text += f" ({100 * row[f'{key}_delta']:+.1f}{spread}{'*' if p is not None and p < SIGNIFICANT else ''})"
    return text


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "", "| setting | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        name = row["setting"] + (" **(failed)**" if row["failed"] else "")
        lines.append(f"| {name} | " + " | ".join(_cell(row, k) for k, _ in COLUMNS) + " |")
    lines += ["", "Percent on the held-out split; mean ± std over seeds where there are several; in brackets the "
              "change against the baseline, ± its standard error over seeds; * where Welch's t-test over the "
              f"seeds puts it outside the seed-to-seed spread (p < {SIGNIFICANT})."]
    return "\n".join(lines)


def rich_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    caption = f"percent, mean ± std over seeds; (change vs baseline ± its standard error, * p < {SIGNIFICANT})"
    table = Table(title=title, header_style="bold", caption=caption)
    table.add_column("setting", no_wrap=True, min_width=max(len(r["setting"]) for r in rows))
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    for row in rows:
        name = row["setting"] + (" [red](failed)[/]" if row["failed"] else "")
        table.add_row(name, *[_cell(row, k) for k, _ in COLUMNS])
    return table


def chart(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Grouped bars: one group per column, one bar per setting (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(COLUMNS))]
        ys = [100 * (row[k] or 0.0) for k, _ in COLUMNS]
        errs = [100 * (row[f"{k}_std"] or 0.0) for k, _ in COLUMNS]
        label = row["setting"] + (" (failed)" if row["failed"] else "")
        ax.bar(xs, ys, width, yerr=errs if any(errs) else None, label=label, capsize=2)
    ax.set_xticks(range(len(COLUMNS)), [label for _, label in COLUMNS])
    ax.set_ylabel("percent (held-out split)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(3, len(rows)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def to_json(rows: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    return json.dumps({**extra, "rows": rows}, indent=1)


def run_ablation(recipe: Recipe, recipe_path: str, components: list[str], seeds: list[int], console,
                 force: bool = False, detach: bool = False, dry_run: bool = False) -> dict[str, Any] | None:
    """Build the graph of every variant, run what is missing, record the table on the ablation's MLflow run.

    -> {"rows", "markdown", "run_id", "tracking_uri", "chart"}; None for --dry-run or --detach.
    """
    import tempfile

    from filipctl.orchestration.pipeline import GraphRun, run_graph

    run = GraphRun(variants(recipe, components, seeds), console, force=force)
    if dry_run:
        run.describe()
        return None
    if detach and not run.backend.native_dependencies:
        raise UsageProblem(f"--detach needs a scheduler (--cluster slurm): {run.backend.name} stages are "
                           "started one after another by this process")
    uri = run.preflight()
    title = f"{recipe.name}: ablation of {', '.join(components)}" + (f" over seeds {seeds}" if len(seeds) > 1 else "")
    tags = {"filipctl.components": ",".join(components), "filipctl.seeds": ",".join(map(str, seeds))}
    if not run_graph(run, uri, recipe_path, detach, ablation={"tags": tags, "description": title}):
        return None
    outcomes = {}
    for variant, keys in run.graph.variants.items():
        done = all(run.outcomes[k].ok for k in keys.values() if k in run.outcomes) and \
            all(k in run.outcomes for k in keys.values())
        outcomes[variant] = (done, run.outcomes[keys["eval"]].metrics if done and "eval" in keys else {})
    rows = table_rows(components, outcomes)
    text = markdown(rows, title)
    with tempfile.TemporaryDirectory(prefix="filip-ablation-") as tmp:
        folder = Path(tmp)
        (folder / "ablation.md").write_text(text + "\n")
        (folder / "ablation.json").write_text(to_json(rows, {"title": title, "components": components,
                                                              "seeds": seeds, "variants": list(outcomes)}))
        chart(rows, title, folder / "ablation.png")
        for name in ("ablation.md", "ablation.json", "ablation.png"):
            run.tracker.log_file(run.top, folder / name)
        saved = Path(recipe.output_dir).resolve() / "ablations" / run.top
        saved.mkdir(parents=True, exist_ok=True)
        for name in ("ablation.md", "ablation.json", "ablation.png"):
            (saved / name).write_bytes((folder / name).read_bytes())
    run.tracker.describe(run.top, text)
    return {"rows": rows, "markdown": text, "title": title, "run_id": run.top, "tracking_uri": uri,
            "chart": str(saved / "ablation.png"), "failed": [r["setting"] for r in rows if r["failed"]]}
