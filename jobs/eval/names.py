"""What each evaluation figure is called in MLflow, result.json and the CLI's tables: one function says it.

The tasks report clip_benchmark's names (acc1, text_retrieval_recall@5, lp_acc1, ...). The held-out
split's figures are the ones a pretraining run is judged by, so they keep short names of their own
(zeroshot_top1, i2t_R5, t2i_R5, eval_pairs) and no set prefix; every other set's are
'<set>.<metric>', with '@' spelled '_at_' (MLflow does not accept '@' in a metric name).
filipctl/reports/eval_tables.py reads the names back in this form.
"""

from __future__ import annotations

import re

HELD_OUT = "held_out"  # the name of the pretraining data's held-out split among the evaluation sets

_HELD_OUT_SHORT = {"acc1": "zeroshot_top1", "acc5": "zeroshot_top5",
                   "mean_per_class_recall": "zeroshot_mean_per_class_recall", "images": "eval_pairs"}
# image -> text retrieval is clip_benchmark's text_retrieval (texts are retrieved), text -> image its image_retrieval
# (ties counted as hits: the same with '_ties_as_hits', jobs/eval/scoring.py)
_RECALL = re.compile(r"(text|image)_retrieval_recall(_ties_as_hits)?@(\d+)")


def metric_name(set_name: str, metric: str) -> str:
    """The name of `metric` (as a task reports it) of the set `set_name`."""
    if set_name != HELD_OUT:
        return f"{set_name}.{metric.replace('@', '_at_')}"
    recall = _RECALL.fullmatch(metric)
    if recall:
        return f"{'i2t' if recall[1] == 'text' else 't2i'}{recall[2] or ''}_R{recall[3]}"  # i2t_ties_as_hits_R1
    return _HELD_OUT_SHORT.get(metric, metric)


def named(set_name: str, metrics: dict[str, float | None]) -> dict[str, float]:
    """A set's figures under their names, as floats; None (not defined for this set, e.g. acc5 under 5
    classes) is left out."""
    return {metric_name(set_name, k): float(v) for k, v in metrics.items() if v is not None}
