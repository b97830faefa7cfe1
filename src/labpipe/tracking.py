"""MLflow tracking: one experiment per research line, one run per stage, a registry with a `champion` alias.

The store is `sqlite:///mlflow.db` with artifacts in `mlruns/` beside it, unless MLFLOW_TRACKING_URI
points elsewhere (an absolute sqlite path, or an `http://` MLflow server such as the compose stack's).
Every run can be mirrored to Weights & Biases (`tracking.wandb: offline|online`); MLflow stays the record.

What makes the store read like the lab's work, for every stage of every line, is done here once: a run is
named after its stage and the params that differ from params.yaml (`grok_train wd=0.03 moe`), logs the
DVC-tracked data it read as MLflow datasets (digest: DVC's md5, as in dvc.lock), and, for a training stage,
MLflow's system metrics; an experiment is tagged as model training; a champion is described in the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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

from labpipe.config import ConfigError, TrackingParams, parse_yaml  # noqa: E402
from labpipe.environment import ENVIRONMENT_TAGS, environment  # noqa: E402
from labpipe.errors import InputError, Terminated, UserError  # noqa: E402

CHAMPION = "champion"
# The experiment tag MLflow 3's UI reads (mlflow/server/js: "mlflow.experimentKind"): without it an experiment
# opens on its GenAI overview, with it on its runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUN_NAME_CHARS = 100  # the whole run name
VALUE_CHARS = 24  # one value in it: a longer path or URI keeps its end, which says the most
PLACEHOLDER = re.compile(r"\$\{([\w.]+)\}")  # dvc.yaml's ${section.key}


def project_root() -> Path:
    """DVC_ROOT when DVC runs the stage (a queued experiment runs in a temp copy of the project, but it belongs
    to the project), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else mlflow.db at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


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
    """The experiment `name`, created as a model-training one (EXPERIMENT_KIND), or tagged so when it lacks a
    kind (created before labpipe set one); a kind someone chose stays."""
    key, kind = EXPERIMENT_KIND
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri(), name),
                                            tags={key: kind})
        except MlflowException:  # created meanwhile by a parallel stage
            found = mlflow.get_experiment_by_name(name)
    if key not in found.tags:
        MlflowClient().set_experiment_tag(found.experiment_id, key, kind)
    return found.experiment_id


# ----------------------------------------------------------------------------- run names


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'grok.lr': 0.001, ...} of a raw params mapping (any schema: a committed file may predate a key)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _read_params(text: str) -> dict[str, Any] | None:
    try:
        raw = parse_yaml(text, where="params.yaml")
    except ConfigError:
        return None
    return _leaves(raw) if isinstance(raw, dict) else None


def committed_params() -> dict[str, Any] | None:
    """The project's params.yaml as committed, flattened: `dvc exp run -S` edits the file itself (in the workspace
    or its temp copy), so the commit is what a run departs from. Without git or a committed file, the file on
    disk; None when there is neither."""
    root = project_root()
    try:
        text = subprocess.run(["git", "-C", str(root), "show", "HEAD:./params.yaml"], capture_output=True,
                              text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        path = root / "params.yaml"
        if not path.is_file():
            return None
        text = path.read_text()
    return _read_params(text)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(map(_as_text, value)) + "]"
    return str(value) if value != "" else '""'


def run_name(stage: str, params: Mapping[str, Any], labels: Mapping[str, str],
             reference: Mapping[str, Any] | None) -> str:
    """`grok_train wd=0.03 moe`: the stage, then each of `params` whose value is not `reference`'s: the line's
    labelled knobs first (registry.Line.labels, in their order: the cap cuts the others first), as `label=value`
    or the value alone, then the others as `last_segment=value`. No reference: the stage alone."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    changed = [] if reference is None else \
        [key for key in params if key not in reference or plain(reference[key]) != plain(params[key])]
    words = [stage]
    for key in [k for k in labels if k in changed] + [k for k in changed if k not in labels]:
        text = _as_text(params[key])
        text = text if len(text) <= VALUE_CHARS else "…" + text[1 - VALUE_CHARS:]
        label = labels.get(key, key.rpartition(".")[2])
        words.append(f"{label}={text}" if label else text)
    name = " ".join(words)
    return name if len(name) <= RUN_NAME_CHARS else name[:RUN_NAME_CHARS - 1] + "…"


# ----------------------------------------------------------------------------- datasets


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for `path` (dvc.lock, .dvc files): a file's, of its bytes; a directory's, the md5 of
    its listing, every file's md5 and path (POSIX, relative) sorted by path as JSON, then ".dir" (dvc_data's
    Tree.digest). Like DVC, .git, .hg and .dvc inside are left out; .dvcignore patterns are not read."""
    if not path.is_dir():
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()
    entries = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in (".git", ".hg", ".dvc")]
        for name in files:
            if name != ".git":
                file = Path(folder) / name
                entries.append({"md5": dvc_md5(file), "relpath": file.relative_to(path).as_posix()})
    listing = json.dumps(sorted(entries, key=lambda entry: entry["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"


def stage_inputs(stage: str, params: Mapping[str, Any]) -> list[Path]:
    """The data that the DVC stage `stage` reads: its deps in ./dvc.yaml but code (src/), `${section.key}`
    filled from `params`, else from ./params.yaml as DVC fills them; a dep not on disk (a stage run by hand
    without it) is left out, and so is everything without a dvc.yaml."""
    if not Path("dvc.yaml").is_file():
        return []
    spec = (parse_yaml(Path("dvc.yaml").read_text(), where="dvc.yaml") or {}).get("stages", {}).get(stage, {})
    on_disk = _read_params(Path("params.yaml").read_text()) if Path("params.yaml").is_file() else None
    values = {**(on_disk or {}), **params}
    found = []
    for dep in spec.get("deps", []):
        path = dep if isinstance(dep, str) else next(iter(dep))
        try:
            path = PLACEHOLDER.sub(lambda match: str(values[match[1]]), path)
        except KeyError:  # a placeholder that nothing fills: DVC itself would refuse the stage
            continue
        if not path.startswith("src/") and Path(path).exists():
            found.append(Path(path))
    return found


def _column_type(arrow: Any) -> Any:
    import pyarrow as pa
    from mlflow.types.schema import AnyType, Array, DataType

    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow):
        return Array(_column_type(arrow.value_type))
    kinds = ((pa.types.is_boolean, DataType.boolean), (pa.types.is_integer, DataType.long),
             (pa.types.is_floating, DataType.double), (pa.types.is_string, DataType.string),
             (pa.types.is_large_string, DataType.string), (pa.types.is_binary, DataType.binary),
             (pa.types.is_timestamp, DataType.datetime))
    return next((kind for test, kind in kinds if test(arrow)), AnyType())


def _schema(path: Path) -> Any:
    """A parquet file's columns, from its footer (no rows are read); None for any other input."""
    if path.suffix != ".parquet":
        return None
    import pyarrow.parquet as pq
    from mlflow.types.schema import ColSpec, Schema

    return Schema([ColSpec(_column_type(field.type), field.name, required=not field.nullable)
                   for field in pq.read_schema(path)])


def _log_inputs(paths: list[Path], context: str) -> None:
    """Each input as an MLflow dataset: its path for name and source, DVC's md5 for digest, its schema."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    datasets = [MetaDataset(get_dataset_source_from_json(json.dumps({"uri": str(path)}), "local"), name=str(path),
                            digest=dvc_md5(path), schema=_schema(path)) for path in paths]
    if datasets:
        mlflow.log_inputs(datasets, [context] * len(datasets), [None] * len(datasets))


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
    """Open (or resume, after a kill) the MLflow run of `stage` in the experiment of its research line. A new run
    is named (run_name), logs `params` and the stage's inputs (stage_inputs); a resumed one keeps all three.
    A training stage logs MLflow's system metrics unless `tracking.system_metrics` is off."""
    from labpipe.registry import STAGES, line_of

    line = line_of(stage)
    check_store()
    mlflow.set_tracking_uri(tracking_uri())
    resume = resume_run_id if run_exists(resume_run_id) else None
    dvc_experiment = os.environ.get("DVC_EXP_NAME")
    env = environment()
    tags = {"labpipe.line": line.experiment, "labpipe.stage": stage, **_code_version(),
            **{f"labpipe.env.{key}": env[key] for key in ENVIRONMENT_TAGS}}
    if dvc_experiment:
        tags["dvc.exp_name"] = dvc_experiment
    training = STAGES[stage].training is not None
    system_metrics = tracking.system_metrics and training
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_interval_s)
    name = None if resume else run_name(stage, params, line.labels, committed_params())
    with mlflow.start_run(run_id=resume, experiment_id=experiment_id(line.experiment), run_name=name, tags=tags,
                          log_system_metrics=system_metrics) as run:
        if resume is None:
            mlflow.log_params({k: str(v) for k, v in params.items()})
            _log_inputs(stage_inputs(stage, params), "training" if training else "input")
        wandb_run = _open_wandb_mirror(tracking, line.experiment, stage, params, run.info.run_id)
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
    _describe_champion(client, version, metric, value, lower_is_better, revision)
    return version


def _describe_champion(client: MlflowClient, version: ModelVersion, metric: str, value: float,
                       lower_is_better: bool, revision: int) -> None:
    """What the registry's pages say: the version, its value and its run; the model, its line, the rule, the data
    of the champion (its run's datasets) and how to load it."""
    run = client.get_run(version.run_id)
    uri = tracking_uri()
    server = uri.rstrip("/") + "/" if uri.startswith(("http://", "https://")) else ""
    link = f"{server}#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    client.update_model_version(version.name, version.version, description=(
        f"Champion: {metric} = {value:.6g}, from run `{run.info.run_name}` ({run.info.run_id}): [{link}]({link})"))
    data = "\n".join(f"- `{item.dataset.name}`: md5 `{item.dataset.digest}`" for item in run.inputs.dataset_inputs)
    client.update_registered_model(version.name, description=(
        f"The champion of the research line **{run.data.tags['labpipe.line']}** (stage "
        f"`{run.data.tags['labpipe.stage']}`): the run with the {'lowest' if lower_is_better else 'highest'} "
        f"`{metric}` ({'lower' if lower_is_better else 'higher'} is better; definition revision {revision}: a champion "
        f"of another revision is replaced, not compared).\n\n"
        f"Data of the champion, version {version.version} (DVC md5s, as in dvc.lock):\n{data or '- none logged'}\n\n"
        f'Load it: `mlflow.pytorch.load_model("models:/{version.name}@{CHAMPION}")`'))
