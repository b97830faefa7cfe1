"""Which MLflow runs a report compares: the selection flags, checked, applied to the runs of the store.

By default, every FINISHED run of the line's stages in the line's experiment, oldest first. Each flag narrows
that: --experiment searches another experiment, --dvc-exp keeps the runs of those DVC experiments (the tag
dvc.exp_name), --tag k=v the runs with that tag; --runs takes the runs named (whatever their status) instead of
searching, and the other flags still apply. A report's own run (tag labpipe.report) is never an input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from labpipe.errors import InputError
from labpipe.report import runs as read

REPORT_TAG = "labpipe.report"


@dataclasses.dataclass(frozen=True)
class Selection:
    run_ids: tuple[str, ...] = ()
    experiment: str | None = None  # None: the line's
    dvc_exps: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        said = ([f"--runs of {len(self.run_ids)} ids"] if self.run_ids else []) \
            + [f"--dvc-exp {name}" for name in self.dvc_exps] + [f"--tag {k}={v}" for k, v in self.tags]
        return " ".join(said) or "every FINISHED run of the line's stages"


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InputError(f"--tag {text!r}: give it as key=value, e.g. --tag labpipe.job_id=3f2a")
    return key, value


def connect() -> str:
    """Point MLflow at the project's store and return its URI; one line when it cannot be read."""
    import mlflow

    from labpipe.tracking import check_store, tracking_uri

    check_store()
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store there and then find nothing in it
        raise InputError(f"no MLflow store at {uri}: run a stage first, or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    return uri


def select(stages: tuple[str, ...], experiment: str, selection: Selection) -> list:
    """The runs of `stages` that the selection picks, oldest first; InputError naming what found none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = connect()
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise InputError(f"no experiment {experiment!r} in {uri}")
    within = found.experiment_id
    if selection.run_ids:
        runs = []
        for run_id in selection.run_ids:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                raise InputError(f"--runs: no run {run_id} in {uri}") from None
            if REPORT_TAG in run.data.tags:
                raise InputError(f"--runs: {run_id} is a report's run, not a run of {', '.join(stages)}")
            if read.stage(run) not in stages:
                raise InputError(f"--runs: {run_id} is a run of {read.stage(run) or 'no labpipe stage'}, "
                                 f"not of {', '.join(stages)}")
            runs.append(run)
        if selection.experiment is None:  # runs named by id need not be in the line's experiment
            within = None
    else:
        runs = search(client, found.experiment_id)
    picked = [run for run in runs if read.stage(run) in stages and REPORT_TAG not in run.data.tags
              and within in (None, run.info.experiment_id)
              and (not selection.dvc_exps or run.data.tags.get("dvc.exp_name") in selection.dvc_exps)
              and all(run.data.tags.get(key) == wanted for key, wanted in selection.tags)]
    if not picked:
        raise InputError(f"no run of {', '.join(stages)} in experiment {experiment!r} of {uri} matches "
                         f"{selection.describe()}")
    return sorted(picked, key=lambda run: run.info.start_time)


def search(client, experiment_id: str) -> list:
    """Every FINISHED run of the experiment, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'FINISHED'", page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def pair(trains: list, evals: list) -> list[tuple[object | None, object | None]]:
    """(training run, its evaluation run) for each training run, the evaluation the newest evaluation run of
    the same DVC experiment (or of none, for both) with the same result params, started after the training run
    (None when there is none); evaluation runs left over stand alone as (None, evaluation)."""
    pairs, used = [], set()
    for train in trains:
        wanted = read.result_params(train)
        matches = [e for e in evals if e.info.start_time >= train.info.start_time
                   and e.data.tags.get("dvc.exp_name") == train.data.tags.get("dvc.exp_name")
                   and all(read.result_params(e).get(key) == v for key, v in wanted.items())]
        evaluation = max(matches, key=lambda e: e.info.start_time, default=None)
        pairs.append((train, evaluation))
        if evaluation is not None:
            used.add(evaluation.info.run_id)
    return pairs + [(None, e) for e in evals if e.info.run_id not in used]
