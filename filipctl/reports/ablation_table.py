"""The ablation table, as markdown (the MLflow description, ablation.md) and for the terminal; the same
cells in both."""

from __future__ import annotations

from rich.table import Table

from filipctl.reports.ablation_rows import COLUMNS, SettingRow

SIGNIFICANT = 0.05  # Welch's t-test over seeds: a change marked * is unlikely to be seed noise alone


def cell(row: SettingRow, key: str) -> str:
    """'60.0 ± 10.0 (+40.0 ± 8.2*)': mean ± std over seeds, then the change against the baseline ± its
    standard error, * where significant."""
    c = row.columns[key]
    if c.mean is None:
        return "failed" if row.failed else "-"
    text = f"{100 * c.mean:.1f}"
    if c.std is not None:
        text += f" ± {100 * c.std:.1f}"
    if c.delta is not None:
        spread = f" ± {100 * c.delta_se:.1f}" if c.delta_se is not None else ""
        text += f" ({100 * c.delta:+.1f}{spread}{'*' if c.p is not None and c.p < SIGNIFICANT else ''})"
    return text


def markdown(rows: list[SettingRow], title: str) -> str:
    lines = [f"### {title}", "", "| setting | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        name = row.setting + (" **(failed)**" if row.failed else "")
        lines.append(f"| {name} | " + " | ".join(cell(row, k) for k, _ in COLUMNS) + " |")
    lines += ["", "Percent on the held-out split; mean ± std over seeds where there are several; in brackets the "
              "change against the baseline, ± its standard error over seeds; * where Welch's t-test over the "
              f"seeds puts it outside the seed-to-seed spread (p < {SIGNIFICANT})."]
    return "\n".join(lines)


def rich_table(rows: list[SettingRow], title: str) -> Table:
    caption = f"percent, mean ± std over seeds; (change vs baseline ± its standard error, * p < {SIGNIFICANT})"
    table = Table(title=title, header_style="bold", caption=caption)
    # The setting is what a reader looks for: never cut, however narrow the terminal.
    table.add_column("setting", no_wrap=True, min_width=max(len(r.setting) for r in rows))
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    for row in rows:
        name = row.setting + (" [red](failed)[/]" if row.failed else "")
        table.add_row(name, *[cell(row, k) for k, _ in COLUMNS])
    return table
