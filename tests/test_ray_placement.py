"""Whether a Ray cluster's nodes can hold a worker group (filipctl/backends/ray_placement.py), without a Ray."""

from __future__ import annotations

import pytest

from filipctl.backends.ray import missing_resources
from filipctl.backends.ray_placement import node_name, unplaceable, workers_on_node
from filipctl.schema import RayProfile

# The two-node test cluster as `ray_driver --probe` prints it (scripts/ray-up.sh: 2 CPUs per node).
N1 = {"CPU": 2.0, "memory": 2.4e10, "node:10.77.0.11": 1.0, "node:__internal_head__": 1.0}
N2 = {"CPU": 2.0, "memory": 2.4e10, "node:10.77.0.12": 1.0}
GPU_NODE = {"CPU": 16.0, "GPU": 4.0, "node:10.0.0.5": 1.0}


@pytest.mark.parametrize("bundle, node, held", [
    ({"CPU": 1}, N1, 2),
    ({"CPU": 2}, N1, 1),
    ({"CPU": 3}, N1, 0),
    ({"CPU": 0.1}, {"CPU": 0.3}, 3),  # Ray's resources are decimal: 3 x 0.1 fills 0.3 exactly
    ({"CPU": 2, "GPU": 1}, GPU_NODE, 4),  # the scarcer resource decides
    ({"CPU": 1, "GPU": 1}, N1, 0),  # a resource the node lacks
    ({"CPU": 0}, N1, 8),  # asks for nothing: fits anywhere, up to the limit
])
def test_workers_on_one_node(bundle: dict, node: dict, held: int) -> None:
    assert workers_on_node(bundle, node, limit=8) == held


@pytest.mark.parametrize("bundle, workers, strategy, why", [
    ({"CPU": 1}, 2, "STRICT_SPREAD", None),  # the test profile: one worker per node
    ({"CPU": 1}, 2, "STRICT_PACK", None),  # both on one node
    ({"CPU": 2}, 2, "PACK", None),
    ({"CPU": 2}, 2, "SPREAD", None),
    ({"CPU": 2}, 2, "STRICT_SPREAD", None),
    # 4 CPUs in all hold these by their totals; the nodes do not.
    ({"CPU": 2}, 2, "STRICT_PACK", "STRICT_PACK puts all 2 on one node, and a node holds 1 at most"),
    ({"CPU": 3}, 1, "PACK", "no node can hold even one"),
    ({"CPU": 1.5}, 2, "STRICT_PACK", "STRICT_PACK puts all 2 on one node, and a node holds 1 at most"),
    ({"CPU": 1}, 3, "STRICT_SPREAD", "STRICT_SPREAD puts each on a node of its own, and 2 of the 2 nodes can hold one"),
    ({"CPU": 1}, 4, "SPREAD", None),  # a preference: two per node is fine
    ({"CPU": 1.5}, 2, "PACK", None),
    ({"CPU": 1.5}, 3, "PACK", "the nodes hold 2 of them at most"),  # 4.5 > 4 anyway, but per node 1 + 1
])
def test_placement_on_two_2_cpu_nodes(bundle: dict, workers: int, strategy: str, why: str | None) -> None:
    assert unplaceable(bundle, workers, [N1, N2], strategy) == why


def test_unknown_strategy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        unplaceable({"CPU": 1}, 1, [N1], "PACKED")


def test_nodes_are_named_by_their_address() -> None:
    assert [node_name(n, i) for i, n in enumerate([N1, N2, {"CPU": 1.0}])] == ["10.77.0.11", "10.77.0.12", "node 3"]


GPU_NODE2 = {**{k: v for k, v in GPU_NODE.items() if not k.startswith("node:")}, "node:10.0.0.6": 1.0}


@pytest.mark.parametrize("profile, nodes, expected", [
    # The totals fit (4 CPUs), no node does: what comparing totals alone let through.
    ({"workers": 1, "resources_per_worker": {"CPU": 3}}, [N1, N2],
     "1 worker x {'CPU': 3.0} cannot be placed on the Ray cluster's 2 nodes with placement_strategy PACK: no node "
     "can hold even one (nodes: 10.77.0.11 CPU 2, 10.77.0.12 CPU 2)"),
    ({"workers": 2, "resources_per_worker": {"CPU": 2}, "placement_strategy": "STRICT_PACK"}, [N1, N2],
     "2 workers x {'CPU': 2.0} cannot be placed on the Ray cluster's 2 nodes with placement_strategy STRICT_PACK: "
     "STRICT_PACK puts all 2 on one node, and a node holds 1 at most (nodes: 10.77.0.11 CPU 2, 10.77.0.12 CPU 2)"),
    # The two-node test profile fits; so do the same workers packed on one node.
    ({"workers": 2, "placement_strategy": "STRICT_SPREAD"}, [N1, N2], None),
    ({"workers": 2, "placement_strategy": "STRICT_PACK"}, [N1, N2], None),
    # One node lost: the spread group no longer fits, though the CPUs would.
    ({"workers": 2, "placement_strategy": "STRICT_SPREAD"}, [N1],
     "2 workers x {'CPU': 1.0} cannot be placed on the Ray cluster's 1 node with placement_strategy STRICT_SPREAD: "
     "STRICT_SPREAD puts each on a node of its own, and 1 of the 1 nodes can hold one (nodes: 10.77.0.11 CPU 2)"),
    # Short in total: said by the totals, as before.
    ({"workers": 3, "resources_per_worker": {"CPU": 2}}, [N1, N2],
     "3 workers x {'CPU': 2.0} do not fit the Ray cluster (CPU: needs 6, has 4)"),
    # GPU workers: one GPU each unless asked otherwise.
    ({"workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 2}}, [GPU_NODE, GPU_NODE2], None),
    ({"workers": 5, "use_gpu": True, "resources_per_worker": {"CPU": 2}, "placement_strategy": "STRICT_PACK"},
     [GPU_NODE, GPU_NODE2],
     "5 workers x {'CPU': 2.0, 'GPU': 1.0} cannot be placed on the Ray cluster's 2 nodes with placement_strategy "
     "STRICT_PACK: STRICT_PACK puts all 5 on one node, and a node holds 4 at most (nodes: 10.0.0.5 CPU 16 GPU 4, "
     "10.0.0.6 CPU 16 GPU 4)"),
])
def test_missing_resources_places_the_workers_on_each_node(profile: dict, nodes: list, expected: str | None) -> None:
    assert missing_resources(RayProfile(**profile), nodes) == expected


def test_one_mapping_is_a_one_node_cluster() -> None:
    """The private Ray (address: local) is one node, given by its totals."""
    assert missing_resources(RayProfile(workers=2, placement_strategy="STRICT_SPREAD"), {"CPU": 8.0}) == (
        "2 workers x {'CPU': 1.0} cannot be placed on the Ray cluster's 1 node with placement_strategy STRICT_SPREAD: "
        "STRICT_SPREAD puts each on a node of its own, and 1 of the 1 nodes can hold one (nodes: node 1 CPU 8)")
    assert missing_resources(RayProfile(workers=2), {"CPU": 8.0}) is None


def test_placement_strategy_is_checked_by_the_schema() -> None:
    from pydantic import ValidationError

    assert RayProfile().placement_strategy == "PACK"
    with pytest.raises(ValidationError, match="STRICT_SPREAD"):
        RayProfile(placement_strategy="spread")
