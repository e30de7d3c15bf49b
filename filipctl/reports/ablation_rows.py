"""The ablation table's rows: one per setting, each column's figures over its seeds; and their JSON shape.

Orchestration (filipctl.orchestration.ablation) computes them, the views (ablation_table, ablation_chart) draw
them. They live here so that the views need nothing from orchestration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The paper's columns: MSCOCO-style retrieval R@1/R@5 both ways and zero-shot top-1, here on the held-out split;
# then what late interaction is meant to improve: retrieval against captions that differ in one attribute
# (jobs/eval/hard_negatives.py) and word-patch pointing accuracy (jobs/eval/alignment.py).
COLUMNS = (("i2t_R1", "I2T R@1"), ("i2t_R5", "I2T R@5"), ("t2i_R1", "T2I R@1"), ("t2i_R5", "T2I R@5"),
           ("zeroshot_top1", "zero-shot top-1"), ("finegrained_R1", "fine-grained R@1"), ("pointing_acc", "pointing"))


@dataclass(frozen=True)
class ColumnStats:
    """One column of one setting. None where there is nothing to say (no value, one seed, the baseline)."""

    values: list[float]  # one per finished seed that reported the metric
    mean: float | None
    std: float | None  # needs two values
    delta: float | None = None  # mean minus the baseline's
    delta_se: float | None = None  # standard error of delta over seeds
    p: float | None = None  # two-sided Welch's t-test of this setting's seeds against the baseline's


@dataclass(frozen=True)
class SettingRow:
    setting: str
    seeds: int  # variants run for this setting
    finished: int
    failed: bool  # some variant did not finish
    columns: dict[str, ColumnStats]  # by COLUMNS key


def to_dict(row: SettingRow) -> dict[str, Any]:
    """The row as ablation.json and `filipctl ablate --json` have always written it (flat keys, in this order),
    so that scripts reading them keep working."""
    out: dict[str, Any] = {"setting": row.setting, "seeds": row.seeds, "finished": row.finished,
                           "failed": row.failed}
    for key, _ in COLUMNS:
        c = row.columns[key]
        out.update({f"{key}_values": c.values, key: c.mean, f"{key}_std": c.std})
    for key, _ in COLUMNS:
        c = row.columns[key]
        out.update({f"{key}_delta": c.delta, f"{key}_delta_se": c.delta_se, f"{key}_p": c.p})
    return out


def from_dict(data: dict[str, Any]) -> SettingRow:
    """The inverse of to_dict: a row read back from ablation.json or run_ablation's result."""
    columns = {key: ColumnStats(values=data[f"{key}_values"], mean=data[key], std=data[f"{key}_std"],
                                delta=data[f"{key}_delta"], delta_se=data[f"{key}_delta_se"], p=data[f"{key}_p"])
               for key, _ in COLUMNS}
    return SettingRow(setting=data["setting"], seeds=data["seeds"], finished=data["finished"],
                      failed=data["failed"], columns=columns)
