"""The ablation as a bar chart (ablation.png): one group per column, one bar per setting."""

from __future__ import annotations

from pathlib import Path

from filipctl.reports.ablation_rows import COLUMNS, SettingRow


def chart(rows: list[SettingRow], title: str, path: Path) -> Path:
    """Grouped bars: one group per column, one bar per setting (error bars: std over seeds)."""
    import matplotlib  # only here: the CLI's import stays light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(COLUMNS))]
        ys = [100 * (row.columns[k].mean or 0.0) for k, _ in COLUMNS]
        errs = [100 * (row.columns[k].std or 0.0) for k, _ in COLUMNS]
        label = row.setting + (" (failed)" if row.failed else "")
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
