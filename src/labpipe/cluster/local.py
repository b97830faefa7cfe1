"""Local jobs: DVC's experiment queue does the scheduling.

A task is one queued experiment, `dvc exp run --queue --name <name> -S key=value <stage>`: DVC captures
the working tree (the commit and, with --allow-dirty, its changes) when it queues it and runs it in a temp
copy of the project. `dvc queue start --jobs N` starts N workers, each running one experiment at a time; the
MLflow runs of an experiment carry the tag `dvc.exp_name` (see labpipe.tracking), by which jobs finds them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_BIN = Path(sys.executable).parent  # this environment's dvc and labpipe, whatever PATH says
_DVC = str(_BIN / "dvc")


class QueueError(RuntimeError):
    pass


def _env(**extra: str) -> dict[str, str]:
    """DVC's worker runs `dvc`, and the stages run `labpipe`, from PATH: this environment's come first."""
    return {**os.environ, "PATH": os.pathsep.join([str(_BIN), os.environ.get("PATH", "")]), **extra}


def dvc(project: Path, *args: str) -> str:
    done = subprocess.run([_DVC, *args], cwd=project, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise QueueError(f"dvc {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def queue(project: Path, name: str, stage: str, overrides: list[str]) -> None:
    flags = [flag for override in overrides for flag in ("-S", override)]
    dvc(project, "exp", "run", "--queue", "--name", name, *flags, stage)


def start(project: Path, tracking_uri: str, workers: int = 1) -> None:
    """Start `workers` workers, each running one queued experiment at a time. Queued experiments run in temp
    copies: the store is named, so their runs land in it."""
    env = _env(MLFLOW_TRACKING_URI=tracking_uri)
    # The worker outlives this call and inherits its output streams: a file, not a pipe, which would keep
    # this call waiting for the worker to exit.
    with tempfile.TemporaryFile("w+") as errors:
        done = subprocess.run([_DVC, "queue", "start", "--jobs", str(workers)], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=errors)
        if done.returncode != 0:
            errors.seek(0)
            raise QueueError(f"dvc queue start: {errors.read().strip()}")


@dataclasses.dataclass(frozen=True)
class Queue:
    tasks: dict[str, str]  # experiment name -> Queued | Running | Success | Failed
    workers: int  # active and idle: any of them starts the next queued experiment


def parse_status(text: str) -> Queue:
    """`dvc queue status`:

        Task     Name    Created    Status
        7e7b160  j1      04:36 AM   Success

        Worker status: 1 active, 0 idle
    """
    lines = text.splitlines()
    tasks = {}
    for line in lines[1:]:
        if not line.strip():
            break
        fields = line.split()
        tasks[fields[1]] = fields[-1]
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return Queue(tasks, int(workers[1]) + int(workers[2]) if workers else 0)


def status(project: Path) -> Queue:
    return parse_status(dvc(project, "queue", "status"))


def remove(project: Path, name: str) -> None:
    """Take a queued (or finished) experiment out of the queue."""
    dvc(project, "queue", "remove", name)


def kill(project: Path, name: str) -> None:
    """Stop a running experiment; the queue then lists it as Failed."""
    dvc(project, "queue", "kill", name)


def logs(project: Path, name: str) -> str:
    return dvc(project, "queue", "logs", name)
