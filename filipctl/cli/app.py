"""The `filipctl` command line: the Typer app, the commands of each module registered on it, and `main()`, which
turns every failure into one message and an exit status.

Heavy libraries are imported inside commands, never at module level.
"""

from __future__ import annotations

import sys

import typer

from filipctl.cli import consoles, follow, reproduce, run
from filipctl.cli.data import data_app
from filipctl.cli.recipe import recipe_app
from filipctl.errors import FilipctlError

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
# One by one rather than one Typer per module: `filipctl --help` lists the commands in this order, a user's
# (start, follow, reproduce), not the modules'. Sub-apps come after the commands whatever the order here.
app.command()(run.run)
app.command()(run.ablate)
app.command()(follow.status)
app.command("eval")(run.eval_)
app.command()(reproduce.reproduce)
app.command()(reproduce.diff)
app.command()(follow.logs)
app.command()(follow.cancel)
app.command()(follow.sync)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")


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
    consoles.renew()  # after COLUMNS is cleaned: a Console reads it when made
    usage_errors, aborts = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except FilipctlError as e:
        # The message may quote a job's log: "[/path...]" there is text, not rich markup.
        consoles.err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except usage_errors as e:  # the usage line and one message, as click prints them; exit status 2
        if hasattr(e, "ctx") and e.ctx is None:
            e.ctx = _context_for(sys.argv[1:])
        e.show()
        sys.exit(e.exit_code)
    except (*aborts, KeyboardInterrupt):
        consoles.err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # an input nobody foresaw: still one line; the traceback on request
        if os.environ.get("FILIPCTL_DEBUG"):
            raise
        what = " ".join(str(e).split())[:500] or "(no message)"
        consoles.err.print(f"[bold red]error:[/] {escape(type(e).__name__)}: {escape(what)} (unexpected: set "
                           "FILIPCTL_DEBUG=1 for the traceback, and please report it)", highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
