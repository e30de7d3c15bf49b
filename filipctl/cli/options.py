"""The options and arguments several commands share, each defined once: the recipe and its --set overrides,
--json, a run reference, and the tracking store (--tracking-uri, --experiment, --tracking-timeout)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, TypeVar

import typer

if TYPE_CHECKING:
    from filipctl.schema import Recipe

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


def load(path: str, sets: list[str] | None, cluster: str | None = None) -> Recipe:
    """The recipe that RECIPE, --set (and --cluster) name, validated; nothing is written before this."""
    from filipctl.recipes import load_recipe

    return load_recipe(path, sets or [], cluster=cluster)


# The tracking options: one `tracking: Tracking` parameter in a command, three options on its command line.
TrackingUriOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here).")]
ExperimentOpt = Annotated[str, typer.Option("--experiment", help="MLflow experiment.")]
TrackingTimeoutOpt = Annotated[float, typer.Option(
    "--tracking-timeout", min=0.1, max=3600,
    help="Seconds an http(s) tracking server may take to answer before giving up.")]


@dataclass(frozen=True)
class Tracking:
    """The MLflow store a command reads runs from (--tracking-uri, --experiment, --tracking-timeout).

    The defaults here are the options' defaults.
    """

    uri: Optional[str] = None
    experiment: str = "filip"
    timeout_s: float = 5.0

    def checked_uri(self) -> str:
        """The store a read command uses: it must exist (sqlite) or answer in time (a server)."""
        from filipctl import tracking

        resolved = tracking.resolve_uri(self.uri)
        tracking.check_store(resolved, self.timeout_s, must_exist=True)
        return resolved


# (command-line parameter, Tracking field, its option), in the order --help lists them.
_TRACKING_OPTIONS = (
    ("tracking_uri", "uri", TrackingUriOpt),
    ("experiment", "experiment", ExperimentOpt),
    ("tracking_timeout", "timeout_s", TrackingTimeoutOpt),
)

Command = TypeVar("Command", bound=Callable[..., Any])


def tracking_options(command: Command) -> Command:
    """Show typer the command's `tracking: Tracking = Tracking()` parameter as the three tracking options, in its
    place, and hand the command one Tracking made of their values.

    Typer has no parameter groups: it reads options from the signature, so the signature is what is rewritten.
    """
    signature = inspect.signature(command, eval_str=True)
    bundles = [p for p in signature.parameters.values() if p.annotation is Tracking]
    if len(bundles) != 1:
        raise TypeError(f"{command.__name__}: @tracking_options needs one parameter `tracking: Tracking = Tracking()`")
    bundle = bundles[0]
    defaults = Tracking()
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if p is bundle:
            params += [inspect.Parameter(name, p.kind, default=getattr(defaults, field), annotation=option)
                       for name, field, option in _TRACKING_OPTIONS]
        else:
            params.append(p)

    @functools.wraps(command)
    def with_tracking(**kwargs: Any) -> Any:
        kwargs[bundle.name] = Tracking(**{field: kwargs.pop(name) for name, field, _ in _TRACKING_OPTIONS})
        return command(**kwargs)

    new = signature.replace(parameters=params)  # refuses a name taken twice
    with_tracking.__signature__ = new  # type: ignore[attr-defined]
    # typer also reads the annotations (typing.get_type_hints): the rewritten ones, already evaluated.
    with_tracking.__annotations__ = {p.name: p.annotation for p in params} | {"return": new.return_annotation}
    return with_tracking  # type: ignore[return-value]
