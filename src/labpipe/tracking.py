"""MLflow tracking: one experiment per research line, one run per stage, a registry with a `champion` alias.

The store is `sqlite:///mlflow.db` with artifacts in `mlruns/` beside it, unless MLFLOW_TRACKING_URI
points elsewhere (an absolute sqlite path, or an `http://` MLflow server such as the compose stack's).
Every run can be mirrored to Weights & Biases (`tracking.wandb: offline|online`); MLflow stays the record.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from a lab machine

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from labpipe.config import TrackingParams  # noqa: E402
from labpipe.environment import ENVIRONMENT_TAGS, environment  # noqa: E402
from labpipe.errors import InputError, Terminated, UserError  # noqa: E402

CHAMPION = "champion"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else mlflow.db at the project root: DVC_ROOT when DVC runs the stage (a queued
    experiment runs in a temp copy of the project, but its runs belong in the project's store)."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a local SQLite store go to `mlruns/` next to the database file, wherever the stage
    runs (DVC's queued experiments run in temp copies of the project); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.resolve().parent / "mlruns" / experiment).as_uri()
    return None


class TrackingError(UserError):
    """The MLflow store cannot be used (unreachable server, missing folder, unknown scheme)."""

    exit_code = 1


STORE_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def store_problem(uri: str, timeout: float) -> str | None:
    """What makes the MLflow store at `uri` unusable, in one line, within `timeout` seconds; None if nothing
    (a sqlite folder that exists and is writable, a server that answers GET /health; other stores unchecked)."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        target = database if database.exists() else database.parent
        if not target.exists():
            return f"{uri}: the directory {database.parent} does not exist"
        if not os.access(target, os.W_OK):
            return f"{uri}: {target} is not writable"
        return None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as error:
            return f"MLflow server {uri} answered HTTP {error.code} to GET {error.url}"
        except (urllib.error.URLError, OSError) as error:
            return (f"MLflow server {uri} is unreachable ({getattr(error, 'reason', error)}; GET /health, "
                    f"{timeout:g} s timeout): start it (docker compose up -d mlflow) or point MLFLOW_TRACKING_URI "
                    "at a running one (unset: this project's mlflow.db)")
        return None
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.split("+")[0] not in STORE_SCHEMES:
        return f"{uri}: not an MLflow tracking URI (a path, or one of {', '.join(STORE_SCHEMES)})"
    return None


def check_store(timeout: float = 5.0) -> None:
    """Fail fast with one line when the store cannot be used: MLflow itself would retry for minutes."""
    problem = store_problem(tracking_uri(), timeout)
    if problem is not None:
        raise TrackingError(problem)


def load_logged_model(source: str) -> Any:
    """The torch module logged at an MLflow model URI, on the CPU; InputError naming the source when the store
    or the model is not there."""
    import mlflow.pytorch

    from labpipe.inputs import reason

    check_store()
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store here and then report that the model does not exist
        raise InputError(f"{source}: no MLflow store at {uri} (train first, or set MLFLOW_TRACKING_URI)")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(source, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - unknown name or alias, missing artifacts: the source is unusable
        raise InputError(f"{source}: cannot load the model ({reason(error)})") from None


def experiment_id(name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri(), name))
    except MlflowException:  # created meanwhile by a parallel stage
        return mlflow.get_experiment_by_name(name).experiment_id


class StageRun:
    """The MLflow run of one stage; every metric also goes to the wandb mirror when one is open."""

    def __init__(self, run_id: str, wandb_run: Any = None):
        self.run_id = run_id
        self._wandb = wandb_run

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {name: float(value) for name, value in metrics.items()}
        mlflow.log_metrics(clean, step=step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_outputs(self, paths: list[str | Path]) -> None:
        """Record the DVC-tracked outputs of the stage, so a run leads to its data and back."""
        mlflow.set_tag("dvc.outs", ",".join(str(p) for p in paths))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_torch_model(self, model: Any, name: str = "model") -> str:
        """Log a torch module as an MLflow model; returns its URI for `register_if_better`."""
        import mlflow.pytorch

        info = mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",  # our modules are importable classes; pt2 would need tracing
            pip_requirements=["torch", "labpipe"],  # explicit: inference would import-scan the whole env
        )
        return info.model_uri


def run_exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


@contextlib.contextmanager
def stage_run(
    tracking: TrackingParams,
    stage: str,
    params: Mapping[str, Any],
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Open (or resume, after a kill) the MLflow run of `stage` in the experiment of its research line."""
    from labpipe.registry import line_of

    line = line_of(stage).experiment
    check_store()
    mlflow.set_tracking_uri(tracking_uri())
    resume = resume_run_id if run_exists(resume_run_id) else None
    dvc_experiment = os.environ.get("DVC_EXP_NAME")
    env = environment()
    tags = {"labpipe.line": line, "labpipe.stage": stage, **_code_version(),
            **{f"labpipe.env.{key}": env[key] for key in ENVIRONMENT_TAGS}}
    if dvc_experiment:
        tags["dvc.exp_name"] = dvc_experiment
    run_name = f"{stage}:{dvc_experiment}" if dvc_experiment else None
    with mlflow.start_run(run_id=resume, experiment_id=experiment_id(line), run_name=run_name, tags=tags) as run:
        if resume is None:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        wandb_run = _open_wandb_mirror(tracking, line, stage, params, run.info.run_id)
        try:
            yield StageRun(run.info.run_id, wandb_run)
        except (Terminated, KeyboardInterrupt):
            mlflow.end_run("KILLED")
            raise
        finally:
            if wandb_run is not None:
                wandb_run.finish()


def _open_wandb_mirror(tracking: TrackingParams, line: str, stage: str, params: Mapping[str, Any], run_id: str):
    if tracking.wandb == "off":
        return None
    import wandb  # imported only when asked for: slow to import, and never needed otherwise

    return wandb.init(
        project=tracking.wandb_project,
        group=line,
        job_type=stage,
        name=f"{stage}-{run_id[:8]}",
        id=run_id,  # the same id as the MLflow run: a resumed stage resumes its mirror too
        resume="allow",
        config=dict(params),
        mode=tracking.wandb,
        dir=os.environ.get("WANDB_DIR", "."),
    )


def _code_version() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "labpipe.git_dirty": str(bool(dirty))}


def register_if_better(
    model_uri: str,
    name: str,
    metric: str,
    value: float,
    lower_is_better: bool = True,
    revision: int = 1,
) -> ModelVersion | None:
    """Register `model_uri` as a new version of `name` and move the `champion` alias to it, but only when
    `value` of `metric` improves on the current champion's, or the champion's metric is of another
    `revision` (registry.Champion: another definition, not comparable). Returns the new version, or None."""
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    comparable = champion is not None and f"metric.{metric}" in champion.tags \
        and int(champion.tags.get("metric_revision", 1)) == revision
    if comparable:
        best = float(champion.tags[f"metric.{metric}"])
        if not (value < best if lower_is_better else value > best):
            return None
    version = mlflow.register_model(model_uri, name, tags={f"metric.{metric}": repr(float(value)),
                                                           "metric_revision": str(revision)})
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version
