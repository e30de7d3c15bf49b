"""Find a pipeline run in MLflow by id prefix (or the latest) and reach its stages' jobs. Reads only."""

from __future__ import annotations

from dataclasses import dataclass

from filipctl.contract import TAG_BACKEND, TAG_JOB, TAG_KIND, TAG_PARENT, TAG_STAGE
from filipctl.errors import FilipctlError


@dataclass
class StageJobRef:
    stage: str
    run_id: str
    state: str
    backend: str
    job_id: str


def pipelines(client, experiment_id: str, max_results: int, kinds: tuple[str, ...] = ("pipeline",)):
    """Runs of the given kinds (pipeline, ablation), newest first."""
    # MLflow's filter language has no OR: one query per kind, merged.
    runs = [r for kind in kinds for r in client.search_runs(
        [experiment_id], f"tags.`{TAG_KIND}` = '{kind}'", order_by=["attributes.start_time DESC"],
        max_results=max_results)]
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)[:max_results]


def stage_runs(client, parent):
    """A pipeline's stage runs, in the order they started."""
    return client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"])


def find_pipeline(client, experiment: str, ref: str | None, kinds: tuple[str, ...] = ("pipeline", "ablation")):
    """The newest run of `kinds` whose id starts with `ref` or whose name is `ref` (the newest of all when None)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FilipctlError(f"no experiment {experiment!r} at {client.tracking_uri}")
    runs = pipelines(client, exp.experiment_id, 500, kinds=kinds)
    if ref:
        runs = [r for r in runs if r.info.run_id.startswith(ref) or r.info.run_name == ref]
    if not runs:
        raise FilipctlError(f"no filipctl run {'matching ' + repr(ref) + ' ' if ref else ''}in experiment "
                            f"{experiment!r} at {client.tracking_uri}; `filipctl status` lists them")
    if ref and len({r.info.run_id for r in runs}) > 1 and not any(r.info.run_name == ref for r in runs):
        raise FilipctlError(f"{ref!r} matches {len(runs)} runs; give more of the run id")
    return runs[0]


def stage_jobs(client, parent) -> list[StageJobRef]:
    """The stages of a pipeline; of an ablation, every variant's stages (a shared stage once)."""
    refs: list[StageJobRef] = []
    for c in stage_runs(client, parent):
        if c.data.tags.get(TAG_KIND) == "variant":
            refs += [r for r in stage_jobs(client, c) if not (r.job_id and any(r.job_id == x.job_id for x in refs))]
            continue
        refs.append(StageJobRef(c.data.tags.get(TAG_STAGE, c.info.run_name), c.info.run_id, c.info.status,
                                c.data.tags.get(TAG_BACKEND, ""), c.data.tags.get(TAG_JOB, "")))
    return refs
