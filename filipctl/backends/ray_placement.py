"""Whether a Ray cluster's nodes can ever hold a Ray Train worker group.

Ray Train reserves one placement group of identical bundles (one per worker, `resources_per_worker`) under the
profile's `placement_strategy`; a group the nodes can never hold waits forever. Totals are not enough: two 2-CPU
nodes have 4 CPUs, yet neither holds a 3-CPU worker, and STRICT_PACK puts every worker on one node. This file
bin-packs the bundles on each node's total resources (not what is free now: a busy cluster queues, it does not
refuse). Pure: the caller asks Ray for the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_EPS = 1e-6  # Ray keeps resources in units of 1/10000: 0.1 * 3 must fit in 0.3


def node_name(resources: Mapping[str, float], index: int) -> str:
    """A node by its address (Ray gives every node a resource `node:<ip>`), else by its position."""
    for key in resources:
        if key.startswith("node:") and not key.startswith("node:__"):
            return key.removeprefix("node:")
    return f"node {index + 1}"


def workers_on_node(bundle: Mapping[str, float], node: Mapping[str, float], limit: int) -> int:
    """How many `bundle`s one node holds at most (capped at `limit`: a bundle that asks for nothing fits anywhere)."""
    fits = [math.floor((node.get(k, 0.0) + _EPS) / v) for k, v in bundle.items() if v > 0]
    return min([limit, *fits])


def placeable(bundle: Mapping[str, float], limit: int, nodes: Sequence[Mapping[str, float]], strategy: str) -> int:
    """How many `bundle`s (up to `limit`) one group can place on `nodes` under `strategy`: what an elastic group
    (workers: MIN-MAX) could start with on an idle cluster."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    each = [workers_on_node(bundle, node, limit) for node in nodes]
    if strategy == "STRICT_PACK":
        return max(each, default=0)
    if strategy == "STRICT_SPREAD":
        return min(limit, sum(1 for n in each if n >= 1))
    return min(limit, sum(each))


def unplaceable(bundle: Mapping[str, float], workers: int, nodes: Sequence[Mapping[str, float]],
                strategy: str) -> str | None:
    """None when `workers` bundles can be placed on `nodes` under `strategy`, else why not (one clause)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    each = [workers_on_node(bundle, node, workers) for node in nodes]
    if max(each, default=0) == 0:
        return "no node can hold even one"
    if strategy == "STRICT_PACK":  # every bundle on one node
        if max(each) >= workers:
            return None
        return f"STRICT_PACK puts all {workers} on one node, and a node holds {max(each)} at most"
    if strategy == "STRICT_SPREAD":  # each bundle on a node of its own
        hosts = sum(1 for n in each if n >= 1)
        if hosts >= workers:
            return None
        return f"STRICT_SPREAD puts each on a node of its own, and {hosts} of the {len(nodes)} nodes can hold one"
    # PACK and SPREAD are preferences: any node may take several bundles.
    if sum(each) >= workers:
        return None
    return f"the nodes hold {sum(each)} of them at most"


def describe_nodes(nodes: Sequence[Mapping[str, float]], keys: Sequence[str]) -> str:
    """'10.77.0.11 CPU 2, 10.77.0.12 CPU 2': each node's total of the resources a worker asks for."""
    def one(i: int, node: Mapping[str, float]) -> str:
        return " ".join([node_name(node, i), *(f"{k} {node.get(k, 0.0):g}" for k in keys)])

    # Sorted: Ray lists its nodes in no fixed order, and the same cluster should read the same every time.
    return ", ".join(sorted(one(i, n) for i, n in enumerate(nodes)))
