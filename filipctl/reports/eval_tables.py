"""Evaluation metrics as tables a person reads: one per evaluation set, with the chance level beside each figure."""

from __future__ import annotations

from rich.table import Table

# Bookkeeping figures: shown in the caption, not as rows.
_COUNTS = ("eval_pairs", "images", "skipped_samples", "pointing_objects", "train_samples", "finegrained_images",
           "finegrained_sT_images", "zeroshot_single_shape_images", "zeroshot_multi_shape_images")


def _set_of(name: str) -> tuple[str, str]:
    """'cifar.acc1' -> ('cifar', 'acc1'); the held-out split's metrics have no prefix."""
    return tuple(name.split(".", 1)) if "." in name else ("held_out", name)  # type: ignore[return-value]


def group(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    sets: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        ds, metric = _set_of(name)
        sets.setdefault(ds, {})[metric] = value
    return sets


def _chance(metric: str, m: dict[str, float]) -> float | None:
    if metric.startswith("finegrained_"):
        return m.get(f"chance_{metric}")
    if metric.startswith("zeroshot_top1") or metric == "acc1":
        return m.get("chance_zeroshot_top1")
    if "_R" in metric and "chance_R1" in m:
        return min(1.0, m["chance_R1"] * int(metric.rsplit("R", 1)[-1]))
    if metric in ("pointing_acc", "pointing_colour", "pointing_shape"):
        return m.get("pointing_chance")
    return None


def tables(metrics: dict[str, float]) -> list[Table]:
    out = []
    for ds, m in group(metrics).items():
        counts = ", ".join(f"{int(m[k])} {k.replace('_', ' ')}" for k in _COUNTS if k in m)
        t = Table(title=f"eval: {ds}", caption=counts, header_style="bold")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_column("chance", justify="right")
        for metric, value in m.items():
            if metric.startswith("chance") or metric in _COUNTS or metric == "pointing_chance":
                continue
            chance = _chance(metric, m)
            t.add_row(metric, f"{value:.3f}", "-" if chance is None else f"{chance:.3f}")
        out.append(t)
    return out
