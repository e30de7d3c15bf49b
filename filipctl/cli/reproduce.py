"""The commands that rebuild and compare tracked runs: `reproduce` (rerun from what MLflow holds) and `diff`
(what made two runs differ). Registered on the app in app.py."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from filipctl.cli import consoles
from filipctl.cli.options import JsonOpt, Tracking, tracking_options
from filipctl.errors import FilipctlError


@tracking_options
def reproduce(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="MLflow run id (a prefix is enough) or name of a "
                                           "run, or of one variant of an ablation.")],
    verify: Annotated[bool, typer.Option("--verify", help="Compare the rerun's loss curve and eval metrics with "
                                         "the original's, bit for bit; exit 1 when they differ.")] = False,
    folder: Annotated[Optional[str], typer.Option("--folder", metavar="DIR", help="Where the rebuilt source and the "
                                                  "rerun go (default runs/reproduce/RUN-TIME).")] = None,
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Keep the git worktree of the rebuilt source "
                                              "(removed after the rerun otherwise).")] = False,
    tracking: Tracking = Tracking(),
    as_json: JsonOpt = False,
) -> None:
    """Rebuild a tracked run from what MLflow holds and run it again into a fresh folder.

    The code is a git worktree at the recorded commit with the recorded uncommitted changes applied;
    the recipe is the recorded one; the environment is compared with the recorded one and what
    differs is named before the rerun. With --verify: "identical", or the first step where the loss
    curves differ and by how much, and why when this machine's CPU is not the original's (reruns are bitwise
    identical per machine type, not across CPUs).
    """
    from pathlib import Path

    from filipctl.orchestration import reproduce as rp
    from filipctl.tracking.runs import find_pipeline
    from filipctl.tracking.provenance import package_versions
    from filipctl.tracking import open_store

    uri = tracking.checked_uri()
    client = open_store(uri)
    original = rp.load_record(client, find_pipeline(client, tracking.experiment, run_ref,
                                                    kinds=("pipeline", "variant")))
    console = consoles.err if as_json else consoles.out
    here = package_versions()
    env_diff = rp.differences(original.versions, here)
    for name, was, now in env_diff:
        console.print(f"environment differs: {name} {was or '(absent)'} -> {now or '(absent)'}", highlight=False,
                      markup=False)
    where = Path(folder) if folder else rp.default_folder(original)
    if where.exists() and any(where.iterdir()):
        raise FilipctlError(f"--folder {where} is not empty; give a new folder")
    where.mkdir(parents=True, exist_ok=True)
    source = where.resolve() / "source"
    console.print(f"rebuilding {original.name}: commit {original.commit[:12]}"
                  + (f" + uncommitted changes ({len(original.patch.splitlines())} patch lines)" if original.patch else "")
                  + f" in {source}", highlight=False, markup=False)
    try:
        rp.rebuild_source(original, source)
        new_id = rp.rerun(original, source, where.resolve(), uri)
    finally:
        if not keep_source:
            rp.remove_source(source)
    again = rp.load_record(client, client.get_run(new_id))
    # This machine's record: the rerun's own was written by the rebuilt code, which may predate the CPU record.
    verdict = rp.verify(client, original, again, here) if verify else None
    if as_json:
        print(json.dumps({"original": original.run_id, "rerun": new_id, "folder": str(where),
                          "environment_differences": env_diff,
                          "identical": verdict.identical if verdict else None,
                          "verdict": verdict.lines if verdict else [],
                          "cause": verdict.cause if verdict else None}, indent=1))
    else:
        consoles.out.print(f"rerun: MLflow run {new_id} (folder {where})", highlight=False, markup=False)
        for line in verdict.lines if verdict else []:
            consoles.out.print(line, highlight=False, markup=False)
    if verdict and not verdict.identical:
        raise typer.Exit(1)


@tracking_options
def diff(
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="MLflow run id (prefix) or name.")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="MLflow run id (prefix) or name.")],
    tracking: Tracking = Tracking(),
    as_json: JsonOpt = False,
) -> None:
    """What made two runs differ: recipe keys, code (commit, uncommitted changes), packages, data, world size.

    Where a run went (output_dir, tracking) is not a difference; loss curves and metrics are results, not causes.
    """
    from filipctl.orchestration import reproduce as rp
    from filipctl.tracking.runs import find_pipeline
    from filipctl.tracking import open_store

    client = open_store(tracking.checked_uri())
    a = rp.load_record(client, find_pipeline(client, tracking.experiment, run_a, kinds=("pipeline", "variant")))
    b = rp.load_record(client, find_pipeline(client, tracking.experiment, run_b, kinds=("pipeline", "variant")))
    found = rp.diff(a, b)
    if as_json:
        print(json.dumps({"a": a.run_id, "b": b.run_id,
                          "differences": {k: [{"name": n, "a": x, "b": y} for n, x, y in v] for k, v in found.items()}},
                         indent=1))
        return
    from rich.table import Table

    if not any(found.values()):
        consoles.out.print(f"{a.name} and {b.name}: same recipe, code, packages, data and world size",
                           highlight=False, markup=False)
        return
    t = Table(title=f"{a.name} vs {b.name}", header_style="bold")
    for col in ("what", "name", a.run_id[:8], b.run_id[:8]):
        t.add_column(col, overflow="fold")
    for kind, rows in found.items():
        for name, x, y in rows:
            t.add_row(kind, name, "(absent)" if x is None else str(x), "(absent)" if y is None else str(y))
    consoles.out.print(t)
