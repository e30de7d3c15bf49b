"""The ablation table over seeds: mean, std, change against the baseline, its standard error and whether
Welch's t-test puts it outside the seed-to-seed spread (checked against the closed form for 4 degrees of
freedom, not against scipy, which the code uses)."""

from __future__ import annotations

import math

import pytest

from filipctl.orchestration import ablation
from filipctl.reports import ablation_table


def _outcomes(per_setting: dict[str, list[float]]) -> dict[str, tuple[bool, dict[str, float]]]:
    out = {}
    for setting, values in per_setting.items():
        for seed, v in enumerate(values):
            out[f"{setting}@seed{seed}"] = (True, {"finegrained_R1": v})
    return out


def test_change_against_the_baseline_with_its_spread() -> None:
    rows = ablation.table_rows(["late_interaction"], _outcomes(
        {"baseline": [0.1, 0.2, 0.3], "+late_interaction": [0.5, 0.6, 0.7]}))
    base, late = rows
    b, fg = base.columns["finegrained_R1"], late.columns["finegrained_R1"]
    assert b.mean == pytest.approx(0.2) and b.std == pytest.approx(0.1)
    assert b.delta is None and b.p is None
    assert fg.delta == pytest.approx(0.4)
    se = math.sqrt(0.01 / 3 + 0.01 / 3)
    assert fg.delta_se == pytest.approx(se)
    # Equal variances and sizes: Welch's df is 4, where two-sided p = 1 - t(t^2+6) / (t^2+4)^(3/2).
    t = 0.4 / se
    assert fg.p == pytest.approx(1 - t * (t * t + 6) / (t * t + 4) ** 1.5, rel=1e-6)
    cell = ablation_table.cell(late, "finegrained_R1")
    assert cell == "60.0 ± 10.0 (+40.0 ± 8.2*)", cell
    assert "* where Welch's t-test" in ablation_table.markdown(rows, "t")


def test_a_change_inside_the_seed_spread_is_not_marked() -> None:
    rows = ablation.table_rows(["late_interaction"], _outcomes(
        {"baseline": [0.1, 0.3, 0.5], "+late_interaction": [0.15, 0.35, 0.6]}))
    late = rows[1]
    assert late.columns["finegrained_R1"].p > 0.5
    assert ablation_table.cell(late, "finegrained_R1").endswith("(+6.7 ± 17.4)")


def test_one_seed_has_no_spread_to_test() -> None:
    outcomes = {"baseline": (True, {"finegrained_R1": 0.2}), "+late_interaction": (True, {"finegrained_R1": 0.3})}
    late = ablation.table_rows(["late_interaction"], outcomes)[1]
    assert late.columns["finegrained_R1"].delta_se is None
    assert ablation_table.cell(late, "finegrained_R1") == "30.0 (+10.0)"
    assert late.columns["i2t_R1"].mean is None and ablation_table.cell(late, "i2t_R1") == "-"
