"""The plan of a graph run for --dry-run: each stage, its key, cached or to run, where it would run (nodes,
placement, rendezvous) and what would be submitted."""

from __future__ import annotations

from rich.console import Console

from filipctl.backends.base import Backend
from filipctl.orchestration.graph import Graph
from filipctl.orchestration.preflight import request_for_planning
from filipctl.reports.placement import describe_placement


def print_plan(console: Console, graph: Graph, backend: Backend, profile: str, cached: set[str]) -> None:
    to_run = [n for n in graph.nodes.values() if n.key not in cached]
    console.print(f"dry run on {backend.name} (profile {profile}): {len(graph.nodes)} stages, {len(to_run)} to run; "
                  "nothing submitted", highlight=False, markup=False)
    for node in graph.nodes.values():
        state = "cached" if node.key in cached else "to run"
        after = f" after {', '.join(node.stage.after)}" if node.stage.after else ""
        users = ", ".join(v or "(run)" for v in node.variants)
        console.print(f"\n# {node.stage.name} {node.key}  {state}{after}  [{users}]", highlight=False, markup=False)
        console.print(f"  folder {node.run_dir.root}", highlight=False, markup=False)
        console.print(f"  runs on {describe_placement(node.recipe, node.stage)}", highlight=False, markup=False,
                      soft_wrap=True)
        if state == "to run":
            console.print(backend.describe(request_for_planning(node, backend)), highlight=False, markup=False,
                          soft_wrap=True)
