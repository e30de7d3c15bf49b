"""Find a pipeline run in MLflow by id prefix (or the latest) and reach its stages' jobs."""

from __future__ import annotations

from dataclasses import dataclass

from filipctl import tracking
from filipctl.errors import FilipctlError


@dataclass
class StageJobRef:
    stage: str
    run_id: str
    state: str
    backend: str
    job_id: str


def find_pipeline(uri: str, experiment: str, ref: str | None):
    """The newest pipeline run whose id starts with `ref` (or the newest of all when ref is None)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FilipctlError(f"no experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=500)
    if ref:
        runs = [r for r in runs if r.info.run_id.startswith(ref) or r.info.run_name == ref]
    if not runs:
        raise FilipctlError(f"no filipctl run {'matching ' + repr(ref) if ref else ''} in experiment {experiment!r} "
                            f"at {uri}; `filipctl status` lists them")
    if ref and len({r.info.run_id for r in runs}) > 1 and not any(r.info.run_name == ref for r in runs):
        raise FilipctlError(f"{ref!r} matches {len(runs)} runs; give more of the run id")
    return client, runs[0]


def stage_jobs(client, parent) -> list[StageJobRef]:
    children = client.search_runs([parent.info.experiment_id], f"tags.`{tracking.PARENT}` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    return [StageJobRef(c.data.tags.get(tracking.TAG_STAGE, c.info.run_name), c.info.run_id, c.info.status,
                        c.data.tags.get(tracking.TAG_BACKEND, ""), c.data.tags.get(tracking.TAG_JOB, ""))
            for c in children]
