"""The `filipctl` command line. Heavy libraries are imported inside commands, never at module level."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from filipctl.cli.data import data_app
from filipctl.errors import FilipctlError, UsageProblem

app = typer.Typer(
    help="Pretrain FILIP (fine-grained late-interaction CLIP) from declarative YAML recipes, "
    "locally or on a cluster, tracked in MLflow.\n\n"
    "Start here:  filipctl run recipes/smoke.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Markdown rewraps docstring paragraphs to the terminal; "rich" kept their line breaks and read
    # "[lists]" in option help as a style tag.
    rich_markup_mode="markdown",
)
recipe_app = typer.Typer(help="Check and inspect recipes without running anything.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY.PATH=VALUE",
                 help="Override one recipe value, e.g. --set train.steps=20 --set model.interaction=global. "
                      "Repeatable; values are YAML (numbers, true/false, [lists]). See `filipctl recipe keys`."),
]
RecipeArg = Annotated[str, typer.Argument(metavar="RECIPE", help="Recipe YAML file, e.g. recipes/smoke.yaml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


RunRef = Annotated[Optional[str], typer.Argument(
    metavar="[RUN]", help="MLflow run id of the pipeline (a prefix is enough) or its name; default: the newest.")]
UriOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here).")]
ExpOpt = Annotated[str, typer.Option("--experiment", help="MLflow experiment.")]
TimeoutOpt = Annotated[float, typer.Option(
    "--tracking-timeout", min=0.1, max=3600,
    help="Seconds an http(s) tracking server may take to answer before giving up.")]


def _tracking_uri(uri: str | None, timeout_s: float) -> str:
    """The store a read command uses: it must exist (sqlite) or answer in time (a server)."""
    from filipctl import tracking

    resolved = tracking.resolve_uri(uri)
    tracking.check_store(resolved, timeout_s, must_exist=True)
    return resolved


def _load(path: str, sets: list[str] | None, cluster: str | None = None):
    from filipctl.recipes import load_recipe

    return load_recipe(path, sets or [], cluster=cluster)


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    cluster: Annotated[Optional[str], typer.Option(
        "--cluster", "-c", help="Cluster profile clusters/NAME.yaml (e.g. slurm, example-site) or a backend "
        "name (local, slurm); overrides the recipe's cluster section.")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Delete this recipe's checkpoints first instead of resuming from them.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan and each stage's job (sbatch script on Slurm); submit nothing.")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="On a scheduler: queue every stage and return (follow with status/logs/cancel).")] = False,
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
    r = _load(recipe, set_, cluster)  # validation first: a bad recipe writes nothing anywhere
    from filipctl.orchestration import pipeline

    console = err if as_json else out
    if dry_run:
        pipeline.dry_run(r, console)
        return
    if detach:
        from filipctl.backends import get_backend

        if not get_backend(r.cluster.backend, r.cluster).native_dependencies:
            # Without a scheduler to hold the afterok chain, this process is what starts each next stage.
            raise UsageProblem(f"--detach needs a scheduler (--cluster slurm): {r.cluster.backend} stages "
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
            out.print(t)
    m, s = divmod(int(result.duration_s), 60)
    out.print(f"done in {m}m{s:02d}s. MLflow run {result.parent_run_id}")
    out.print(f"open the MLflow UI:  {tracking.ui_command(result.tracking_uri)}", highlight=False, soft_wrap=True)


@app.command()
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
    detach: Annotated[bool, typer.Option("--detach", help="On a scheduler: queue the whole graph and return.")] = False,
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
    r = _load(path, set_, cluster)
    console = err if as_json else out
    result = ablation.run_ablation(r, path, comps, seed_list, console, force=force, detach=detach, dry_run=dry_run)
    if result is None:
        return
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
    else:
        out.print(ablation.rich_table(result["rows"], result["title"]))
        out.print(f"MLflow run {result['run_id']} (table, description, chart); chart also at {result['chart']}",
                  highlight=False, markup=False, soft_wrap=True)
    if result["failed"]:
        raise FilipctlError(f"settings with a failed variant: {', '.join(result['failed'])} "
                            "(`filipctl status` and `filipctl logs` show why)")


@app.command()
def status(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=50000, help="How many recent runs.")] = 10,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Recent runs and their stages (state, job, key metric, duration), read from MLflow.

    Stages MLflow still shows as queued or running are checked with their scheduler (sacct on
    Slurm) and MLflow is corrected when the job has started or ended.
    """
    from filipctl.orchestration import status as st
    from filipctl.orchestration.state_index import StateStore
    from filipctl.tracking import Tracker, open_store

    uri = _tracking_uri(tracking_uri, tracking_timeout)
    store = StateStore.open_for(uri)  # the index the control side keeps beside MLflow: no MLflow import
    rows = st.collect_state(store, experiment, limit) if store else st.collect(open_store(uri), experiment, limit)
    fixes = st.corrections(rows)
    if fixes:
        st.record(fixes, Tracker(uri))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        out.print(f"no filipctl runs in experiment {experiment!r} at {uri}", markup=False, highlight=False)
        return
    out.print(st.render(rows))


@app.command("eval")
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
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
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
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    sets.append(f"tracking.experiment={experiment}")
    source = evaluation.resolve(target, tracking_uri, experiment, tracking_timeout)
    r = evaluation.eval_recipe(source, recipe, sets, dataset or [], held_out)
    console = err if as_json else out
    result = evaluation.run_eval(source, r, console, force=force)
    if as_json:
        print(json.dumps({"run_id": result.run_id, "folder": str(result.folder), "cached": result.cached,
                          "metrics": result.metrics, "results": result.results}, indent=1))
        return
    from filipctl.reports.eval_tables import tables

    for t in tables(result.metrics):
        out.print(t)
    out.print(f"clip_benchmark results: {result.folder / 'results'}", highlight=False, markup=False, soft_wrap=True)
    if (result.folder / "alignment").is_dir():
        out.print(f"word-patch alignment maps: {result.folder / 'alignment'}", highlight=False, markup=False,
                  soft_wrap=True)
    out.print(f"{'cached' if result.cached else 'done'} in {result.duration_s:.0f}s. MLflow run {result.run_id}",
              highlight=False)


@app.command()
def reproduce(
    run_ref: Annotated[str, typer.Argument(metavar="RUN", help="MLflow run id (a prefix is enough) or name of a "
                                           "run, or of one variant of an ablation.")],
    verify: Annotated[bool, typer.Option("--verify", help="Compare the rerun's loss curve and eval metrics with "
                                         "the original's, bit for bit; exit 1 when they differ.")] = False,
    folder: Annotated[Optional[str], typer.Option("--folder", metavar="DIR", help="Where the rebuilt source and the "
                                                  "rerun go (default runs/reproduce/RUN-TIME).")] = None,
    keep_source: Annotated[bool, typer.Option("--keep-source", help="Keep the git worktree of the rebuilt source "
                                              "(removed after the rerun otherwise).")] = False,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild a tracked run from what MLflow holds and run it again into a fresh folder.

    The code is a git worktree at the recorded commit with the recorded uncommitted changes applied;
    the recipe is the recorded one; the environment is compared with the recorded one and what
    differs is named before the rerun. With --verify: "identical", or the first step where the loss
    curves differ and by how much.
    """
    from pathlib import Path

    from filipctl.orchestration import reproduce as rp
    from filipctl.tracking.runs import find_pipeline
    from filipctl.tracking.provenance import package_versions
    from filipctl.tracking import open_store

    uri = _tracking_uri(tracking_uri, tracking_timeout)
    client = open_store(uri)
    original = rp.load_record(client, find_pipeline(client, experiment, run_ref, kinds=("pipeline", "variant")))
    console = err if as_json else out
    env_diff = rp.differences(original.versions, package_versions())
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
    verdict = rp.verify(client, original, again) if verify else None
    if as_json:
        print(json.dumps({"original": original.run_id, "rerun": new_id, "folder": str(where),
                          "environment_differences": env_diff,
                          "identical": verdict.identical if verdict else None,
                          "verdict": verdict.lines if verdict else []}, indent=1))
    else:
        out.print(f"rerun: MLflow run {new_id} (folder {where})", highlight=False, markup=False)
        for line in verdict.lines if verdict else []:
            out.print(line, highlight=False, markup=False)
    if verdict and not verdict.identical:
        raise typer.Exit(1)


@app.command()
def diff(
    run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="MLflow run id (prefix) or name.")],
    run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="MLflow run id (prefix) or name.")],
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """What made two runs differ: recipe keys, code (commit, uncommitted changes), packages, data, world size.

    Where a run went (output_dir, tracking) is not a difference; loss curves and metrics are results, not causes.
    """
    from filipctl.orchestration import reproduce as rp
    from filipctl.tracking.runs import find_pipeline
    from filipctl.tracking import open_store

    client = open_store(_tracking_uri(tracking_uri, tracking_timeout))
    a = rp.load_record(client, find_pipeline(client, experiment, run_a, kinds=("pipeline", "variant")))
    b = rp.load_record(client, find_pipeline(client, experiment, run_b, kinds=("pipeline", "variant")))
    found = rp.diff(a, b)
    if as_json:
        print(json.dumps({"a": a.run_id, "b": b.run_id,
                          "differences": {k: [{"name": n, "a": x, "b": y} for n, x, y in v] for k, v in found.items()}},
                         indent=1))
        return
    from rich.table import Table

    if not any(found.values()):
        out.print(f"{a.name} and {b.name}: same recipe, code, packages, data and world size", highlight=False,
                  markup=False)
        return
    t = Table(title=f"{a.name} vs {b.name}", header_style="bold")
    for col in ("what", "name", a.run_id[:8], b.run_id[:8]):
        t.add_column(col, overflow="fold")
    for kind, rows in found.items():
        for name, x, y in rows:
            t.add_row(kind, name, "(absent)" if x is None else str(x), "(absent)" if y is None else str(y))
    out.print(t)


@app.command()
def logs(
    run_ref: RunRef = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Only this stage (data, pretrain, eval).")] = None,
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, help="Last N lines per stage; 0 = all.")] = 40,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
) -> None:
    """Print the job logs of a run's stages, wherever they ran (local processes or Slurm jobs)."""
    from filipctl.backends import get_backend
    from filipctl.tracking.runs import find_pipeline, stage_jobs
    from filipctl.tracking import open_store

    client = open_store(_tracking_uri(tracking_uri, tracking_timeout))
    parent = find_pipeline(client, experiment, run_ref)
    jobs = [j for j in stage_jobs(client, parent) if stage in (None, j.stage)]
    if not jobs:
        raise FilipctlError(f"run {parent.info.run_name} has no stage {stage!r}")
    for j in jobs:
        out.rule(f"{j.stage}  {j.state}  job {j.job_id.split('@')[0] or '-'}")
        text = get_backend(j.backend).logs(j.job_id) if j.job_id else ""
        lines = text.splitlines()
        sys.stdout.write("\n".join(lines[-tail:] if tail else lines) + "\n")


@app.command()
def cancel(
    run_ref: RunRef = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = "filip",
    tracking_timeout: TimeoutOpt = 5.0,
) -> None:
    """Cancel a run: every stage not yet finished is cancelled on its backend and marked KILLED in MLflow."""
    from filipctl.backends import JobState, get_backend
    from filipctl.tracking.runs import find_pipeline, stage_jobs
    from filipctl.orchestration.status import TO_MLFLOW, job_label, scheduler_state
    from filipctl.tracking import ACTIVE, TERMINAL, Tracker, open_store

    uri = _tracking_uri(tracking_uri, tracking_timeout)
    client = open_store(uri)
    parent = find_pipeline(client, experiment, run_ref)
    tracker = Tracker(uri)
    cancelled = []
    for j in stage_jobs(client, parent):
        if j.state in TERMINAL:
            continue
        ended = scheduler_state(j.backend, j.job_id)
        if isinstance(ended, JobState) and ended.done:  # recorded as it ended, not as cancelled
            tracker.end(j.run_id, TO_MLFLOW[ended])
            continue
        if j.job_id:
            get_backend(j.backend).cancel(j.job_id)
        tracker.end(j.run_id, "KILLED")
        label = job_label(j.backend, j.job_id)
        cancelled.append(j.stage + (f" (job {label})" if label else ""))
    if parent.info.status in ACTIVE:
        tracker.end(parent.info.run_id, "KILLED")
    if cancelled:
        out.print(f"cancelled {parent.info.run_name}: {', '.join(cancelled)}", highlight=False, markup=False)
    else:
        out.print(f"{parent.info.run_name} has nothing left to cancel ({parent.info.status})", highlight=False,
                  markup=False)


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe (with its extends: chain and --set overrides) against the schema."""
    from rich.markup import escape

    r = _load(recipe, set_)
    out.print(f"[green]ok[/] {escape(recipe)}: recipe {escape(repr(r.name))}, {r.train.steps} steps, global batch "
              f"{r.train.global_batch}, {r.model.interaction} interaction", highlight=False)
    if r.description:
        out.print(r.description, highlight=False, markup=False)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Print the fully resolved recipe (defaults, extends: and --set applied)."""
    from filipctl.recipes import recipe_to_dict, recipe_to_yaml

    r = _load(recipe, set_)
    if as_json:
        print(json.dumps(recipe_to_dict(r), indent=1))
    else:
        sys.stdout.write(recipe_to_yaml(r))


@recipe_app.command("keys")
def recipe_keys(as_json: JsonOpt = False) -> None:
    """Every recipe key with its type, default and meaning (generated from the schema)."""
    from filipctl.schema_doc import schema_rows

    rows = schema_rows()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    from rich.table import Table

    t = Table(header_style="bold", show_lines=False)
    for col in ("key", "type", "default", "meaning"):
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(row["key"], row["type"], row["default"], row["doc"])
    out.print(t)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage/parameter errors, aborts) of every click flavour that may be installed.

    typer may run on click itself or on its own vendored copy (typer._click), whose exceptions
    are other classes: catching only click's would let a usage error out as a traceback.
    """
    import importlib

    errors: set[type] = set()
    aborts: set[type] = set()
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        errors.update(c for c in (getattr(mod, "ClickException", None),) if isinstance(c, type))
        aborts.update(c for c in (getattr(mod, "Abort", None),) if isinstance(c, type))
    return tuple(errors), tuple(aborts)


def _context_for(argv: list[str]):
    """A click context for the command `argv` names, so that any usage error can show its usage line.

    Some errors (an option missing its value, a value of the wrong type) are raised before
    click has made the command's context, and would print their message alone.
    """
    cmd = typer.main.get_command(app)
    ctx = cmd.context_class(cmd, info_name="filipctl")
    for token in argv:
        sub = cmd.get_command(ctx, token) if hasattr(cmd, "get_command") and not token.startswith("-") else None
        if sub is None:
            break
        cmd, ctx = sub, sub.context_class(sub, info_name=token, parent=ctx)
    return ctx


def _sane_terminal_width() -> None:
    """rich takes COLUMNS as given: 0 or garbage would print nothing at all, error messages included."""
    import os

    columns = os.environ.get("COLUMNS")
    if columns is not None and not (columns.isdigit() and int(columns) >= 20):
        os.environ.pop("COLUMNS")


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's or `timeout`'s stop) leaves like Ctrl-C: a running pipeline cancels its jobs."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    import os

    from rich.markup import escape

    _sane_terminal_width()
    _stop_on_sigterm()
    global out, err
    out, err = Console(), Console(stderr=True)
    usage_errors, aborts = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except FilipctlError as e:
        # The message may quote a job's log: "[/path...]" there is text, not rich markup.
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except usage_errors as e:  # the usage line and one message, as click prints them; exit status 2
        if hasattr(e, "ctx") and e.ctx is None:
            e.ctx = _context_for(sys.argv[1:])
        e.show()
        sys.exit(e.exit_code)
    except (*aborts, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # an input nobody foresaw: still one line; the traceback on request
        if os.environ.get("FILIPCTL_DEBUG"):
            raise
        what = " ".join(str(e).split())[:500] or "(no message)"
        err.print(f"[bold red]error:[/] {escape(type(e).__name__)}: {escape(what)} (unexpected: set FILIPCTL_DEBUG=1 "
                  "for the traceback, and please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
