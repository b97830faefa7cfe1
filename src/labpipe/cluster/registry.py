"""The job registry: one JSON record per job in `.labpipe/jobs/<id>.json`, written atomically.

A record says what was submitted (code, config, data), where (executor, resources) and how to find the job
again (the Slurm job id, or the DVC experiment names); the schedulers keep the state, the record does not.
`.labpipe/` ignores itself (its own .gitignore), so jobs never make the git tree dirty.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import secrets
from pathlib import Path
from typing import Any

from labpipe.files import write_json

ROOT = Path(".labpipe")


class UnknownJob(LookupError):
    """No job, or more than one, answers to the id given."""


@dataclasses.dataclass
class Task:
    """One run of the stage: the whole job, or one value of a sweep (one Slurm array task)."""

    index: int
    overrides: list[str]  # the --set and sweep values of this task, as given (`grok.weight_decay=0.03`)
    params: dict[str, Any]  # the resolved params.yaml this task runs with
    name: str  # local: the DVC experiment's name; slurm: "" (the task is <slurm id>_<index>)
    workdir: str = ""  # slurm: the snapshot of the commit the task runs in


@dataclasses.dataclass
class JobRecord:
    id: str
    stage: str
    executor: str  # local | slurm
    submitted: str  # ISO time
    project: str  # absolute path of the project the job was submitted from
    code: dict[str, Any]  # commit (HEAD), dirty, snapshot (the commit that runs: HEAD, or the dirty tree's)
    data: dict[str, Any]  # dvc_lock_sha256 and dvc_lock (its content): the data versions the stage reads
    tracking_uri: str  # the MLflow store the job's runs go to
    resources: dict[str, Any]  # partition, gpus, time, hold
    tasks: list[Task]
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # tracking.environment() at submission
    slurm_job_id: str = ""
    cancelled: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # modify, release, cancel

    @property
    def folder(self) -> Path:
        """Slurm: submitit's logs and pickles, and one snapshot per task."""
        return Path(self.project) / ROOT / "jobs" / self.id

    def note(self, action: str, **details: Any) -> None:
        self.history.append({"at": now(), "action": action, **details})


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def new_id(stage: str) -> str:
    """`grok_train-20250101-120000-9f3a`: sortable by time, unique, a valid git ref (DVC experiment) name."""
    return f"{stage}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def jobs_dir(project: Path) -> Path:
    directory = project / ROOT / "jobs"
    directory.mkdir(parents=True, exist_ok=True)
    ignore = project / ROOT / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# labpipe's job records and Slurm job folders: local state, never committed\n*\n")
    return directory


def save(record: JobRecord) -> None:
    write_json(jobs_dir(Path(record.project)) / f"{record.id}.json", dataclasses.asdict(record))


def load_all(project: Path) -> list[JobRecord]:
    """Every job of the project, oldest first."""
    records = [_from_json(path) for path in (project / ROOT / "jobs").glob("*.json")]
    return sorted(records, key=lambda r: (r.submitted, r.id))


def find(project: Path, wanted: str) -> JobRecord:
    """The job whose id is `wanted`, or starts with it (when only one does); UnknownJob otherwise."""
    records = load_all(project)
    exact = [r for r in records if r.id == wanted]
    matches = exact or [r for r in records if r.id.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UnknownJob(f"no job {wanted!r} in {project / ROOT / 'jobs'} (labpipe jobs list shows them)")
    raise UnknownJob(f"{wanted!r} matches {len(matches)} jobs: " + ", ".join(r.id for r in matches))


def _from_json(path: Path) -> JobRecord:
    raw = json.loads(path.read_text())
    raw["tasks"] = [Task(**task) for task in raw["tasks"]]
    return JobRecord(**raw)
