"""The commands that start graph runs: `run` (a recipe's stages), `ablate` (the paper's ablation) and `eval`
(an eval stage on a finished run or checkpoint). Registered on the app in app.py."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from filipctl.cli import consoles
from filipctl.cli.options import JsonOpt, RecipeArg, SetOpt, Tracking, load, tracking_options
from filipctl.errors import FilipctlError, UsageProblem

# Where --detach works: a scheduler that holds the graph while this process is gone.
DETACH_NEEDS = "--cluster slurm, or a Ray cluster's Jobs API (cluster.ray.address: http://HEAD:8265)"


def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    cluster: Annotated[Optional[str], typer.Option(
        "--cluster", "-c", help="Cluster profile clusters/NAME.yaml (e.g. slurm, example-site) or a backend "
        "name (local, slurm, ray); overrides the recipe's cluster section.")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Delete this recipe's checkpoints first instead of resuming from them.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan and each stage's job (sbatch script on Slurm); submit nothing.")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="On a scheduler (Slurm, or a Ray cluster's Jobs API address http://HEAD:8265): queue "
        "every stage and return (follow with status/logs/cancel).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a recipe's stages (data -> pretrain -> eval) and track them in MLflow.

    Rerunning the same resolved recipe resumes pretraining from its latest checkpoint.

    Examples:

      filipctl run recipes/smoke.yaml

      filipctl run recipes/smoke.yaml --set train.steps=50 --set model.interaction=global
    """
    if cluster is not None and not cluster.strip():
        raise UsageProblem("--cluster needs a profile name (clusters/NAME.yaml) or a backend: local, slurm, ray")
    r = load(recipe, set_, cluster)  # validation first: a bad recipe writes nothing anywhere
    from filipctl.orchestration import pipeline

    console = consoles.err if as_json else consoles.out
    if dry_run:
        pipeline.dry_run(r, console)
        return
    from filipctl.orchestration import graph_job

    if graph_job.applies(r):  # a Ray cluster's Jobs API: the whole graph runs there as one Ray job
        result = graph_job.run_pipeline(r, recipe, console, fresh=fresh, detach=detach)
        if result is None:
            return
    else:
        if detach:
            from filipctl.backends import get_backend

            if not get_backend(r.cluster.backend, r.cluster).native_dependencies:
                # Without a scheduler to hold the afterok chain, this process is what starts each next stage.
                raise UsageProblem(f"--detach needs a scheduler: {DETACH_NEEDS}; {r.cluster.backend} stages "
                                   "are started one after another by this process")
        result = pipeline.run_pipeline(r, recipe, console, fresh=fresh, detach=detach)
    from filipctl import tracking

    if as_json:
        print(json.dumps({"run_id": result.parent_run_id, "tracking_uri": result.tracking_uri,
                          "workdir": str(result.workdir), "duration_s": result.duration_s,
                          "metrics": result.metrics}, indent=1))
        return
    ev = result.metrics.get("eval")
    if ev:
        from filipctl.reports.eval_tables import tables

        for t in tables(ev):
            consoles.out.print(t)
    m, s = divmod(int(result.duration_s), 60)
    consoles.out.print(f"done in {m}m{s:02d}s. MLflow run {result.parent_run_id}")
    consoles.out.print(f"open the MLflow UI:  {tracking.ui_command(result.tracking_uri, result.experiment_id)}",
                       highlight=False, soft_wrap=True)


def ablate(
    recipe: Annotated[Optional[str], typer.Argument(
        metavar="[RECIPE]", help="Recipe with an ablation: section; default recipes/ablation.yaml (a CPU-sized protocol).")] = None,
    components: Annotated[str, typer.Option(
        "--components", help="Comma-separated components of the recipe's ablation: section, e.g. aug,late_interaction.")] = "",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated training seeds; the table shows mean ± std.")] = "0",
    set_: SetOpt = None,
    cluster: Annotated[Optional[str], typer.Option(
        "--cluster", help="Cluster profile clusters/NAME.yaml or a backend name (local, slurm, ray).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun every stage, even those done before.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the stage graph (each stage, its key, cached or to run); submit nothing.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="On a scheduler (Slurm, or a Ray cluster's Jobs API "
                                         "address http://HEAD:8265): queue the whole graph and return.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The paper's ablation in one command: the baseline, + each component, + all of them; each trained,
    evaluated and compared in one table (terminal, MLflow parent run: table, description, bar chart).

    Stages are keyed by what they read and the worker code: a rerun, or one more component, trains only
    what is missing.

    Example:  filipctl ablate --components aug,late_interaction --seeds 0,1,2
    """
    from pathlib import Path

    from filipctl.orchestration import ablation
    from filipctl.tracking.provenance import SOURCE_ROOT

    path = recipe
    if path is None:
        local = Path("recipes/ablation.yaml")
        path = str(local if local.is_file() else SOURCE_ROOT / "recipes" / "ablation.yaml")
    if cluster is not None and not cluster.strip():
        raise UsageProblem("--cluster needs a profile name (clusters/NAME.yaml) or a backend: local, slurm, ray")
    comps = list(dict.fromkeys(c.strip() for c in components.split(",") if c.strip()))
    try:
        seed_list = list(dict.fromkeys(int(s) for s in seeds.split(",") if s.strip())) or [0]
    except ValueError:
        raise UsageProblem(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    r = load(path, set_, cluster)
    console = consoles.err if as_json else consoles.out
    from filipctl.orchestration import graph_job

    if graph_job.applies(r) and not dry_run:  # a Ray cluster's Jobs API: the whole graph runs there as one Ray job
        result = graph_job.run_ablation(r, path, comps, seed_list, console, force=force, detach=detach)
    else:
        result = ablation.run_ablation(r, path, comps, seed_list, console, force=force, detach=detach, dry_run=dry_run)
    if result is None:
        return
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
    else:
        consoles.out.print(ablation.rich_table(result["rows"], result["title"]))
        consoles.out.print(f"MLflow run {result['run_id']} (table, description, chart); chart also at {result['chart']}",
                           highlight=False, markup=False, soft_wrap=True)
        from filipctl import tracking

        ui = tracking.ui_command(result["tracking_uri"], result.get("experiment_id", ""))
        consoles.out.print(f"open the MLflow UI:  {ui}", highlight=False, markup=False, soft_wrap=True)
    if result["failed"]:
        raise FilipctlError(f"settings with a failed variant: {', '.join(result['failed'])} "
                            "(`filipctl status` and `filipctl logs` show why)")


@tracking_options
def eval_(
    target: Annotated[str, typer.Argument(
        metavar="RUN_OR_CHECKPOINT",
        help="What to evaluate: an MLflow run id (a prefix is enough) or name of a finished run or ablation "
             "variant, its pretrain stage folder, or a model.pt file.")],
    dataset: Annotated[Optional[list[str]], typer.Option(
        "--dataset", "-d", metavar="URL",
        help="An evaluation set in clip_benchmark's WebDataset layout (a folder or fsspec URL holding "
             "classnames.txt / dataset_type.txt and test/0.tar ...). Repeatable; replaces eval.datasets.")] = None,
    held_out: Annotated[Optional[bool], typer.Option(
        "--held-out/--no-held-out", help="Also evaluate on the run's held-out split (default: the recipe's "
        "eval.held_out, when the run has one).")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", metavar="RECIPE", help="The recipe that built a model.pt with no recipe.json beside it.")] = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Evaluate again even when this stage was done before.")] = False,
    tracking: Tracking = Tracking(),
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a finished run or a checkpoint without retraining: zero-shot classification, retrieval,
    linear probe and word-patch alignment maps, written as clip_benchmark result JSON.

    Runs as an eval stage of its own, tracked in MLflow and cached by checkpoint and sets: the same command again reuses it.

    Examples:

      filipctl eval 3f2a --dataset s3://bench/wds_cifar10 --dataset data/wds_flickr30k

      filipctl eval runs/stages/pretrain-0123abcd/model.pt --no-held-out -d data/wds_cifar10
    """
    from filipctl.orchestration import evaluation

    sets = list(set_ or [])
    if tracking.uri:
        sets.append(f"tracking.uri={tracking.uri}")
    sets.append(f"tracking.experiment={tracking.experiment}")
    source = evaluation.resolve(target, tracking.uri, tracking.experiment, tracking.timeout_s)
    r = evaluation.eval_recipe(source, recipe, sets, dataset or [], held_out)
    console = consoles.err if as_json else consoles.out
    result = evaluation.run_eval(source, r, console, force=force)
    if as_json:
        print(json.dumps({"run_id": result.run_id, "folder": str(result.folder), "cached": result.cached,
                          "metrics": result.metrics, "results": result.results}, indent=1))
        return
    from filipctl.reports.eval_tables import tables

    for t in tables(result.metrics):
        consoles.out.print(t)
    consoles.out.print(f"clip_benchmark results: {result.folder / 'results'}", highlight=False, markup=False,
                       soft_wrap=True)
    if (result.folder / "alignment").is_dir():
        consoles.out.print(f"word-patch alignment maps: {result.folder / 'alignment'}", highlight=False,
                           markup=False, soft_wrap=True)
    consoles.out.print(f"{'cached' if result.cached else 'done'} in {result.duration_s:.0f}s. "
                       f"MLflow run {result.run_id}", highlight=False)
