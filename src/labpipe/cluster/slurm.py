"""Slurm's own commands, and parsers of their output.

Job state comes from `squeue` (pending, running, and finished jobs while slurmctld still remembers them,
MinJobAge, 5 minutes by default), never from `sacct`: a cluster without slurmdbd has no accounting, and
submitit, which asks sacct, only warns there. The parsers are pure functions, tested on recorded outputs.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


class SlurmError(RuntimeError):
    """A Slurm command that is missing, cannot reach the controller, or refuses."""


def run(args: list[str], timeout: float = 30) -> str:
    """stdout of a Slurm command; SlurmError with its stderr when it fails."""
    if shutil.which(args[0]) is None:
        raise SlurmError(f"no Slurm here: `{args[0]}` is not on PATH (is this a Slurm login node?)")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise SlurmError(f"`{' '.join(args)}` did not answer in {timeout:.0f} s") from error
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"`{' '.join(args)}` failed: {message[-1] if message else f'exit {done.returncode}'}")
    return done.stdout


def version() -> str:
    return run(["sinfo", "--version"]).strip()  # "slurm-wlm 22.05.8"


# ----------------------------------------------------------------------------- partitions and nodes


def partitions() -> tuple[list[str], str | None]:
    """The partitions Slurm knows, and the default one (`sinfo` marks it with a `*`)."""
    names, default = [], None
    for line in run(["sinfo", "-h", "-o", "%P"]).split():
        name = line.rstrip("*")
        if line.endswith("*"):
            default = name
        if name not in names:
            names.append(name)
    return names, default


@dataclasses.dataclass(frozen=True)
class Gres:
    """One generic resource of a node, e.g. `gpu:a100:4(S:0-1)` -> Gres("gpu", "a100", 4)."""

    name: str
    type: str | None
    count: int


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    partitions: tuple[str, ...]
    state: str
    cpus: int
    cpus_allocated: int
    gres: tuple[Gres, ...]
    gpus_allocated: int

    @property
    def gpus(self) -> int:
        return sum(g.count for g in self.gres if g.name == "gpu")


def fitting(nodes: list[Node], partition: str, gpus: int, tasks: int) -> list[Node]:
    """The nodes of `partition` that have `gpus` GPUs and a CPU for each of `tasks` tasks (free or not)."""
    return [node for node in nodes if partition in node.partitions and node.gpus >= gpus and node.cpus >= tasks]


_COUNT = re.compile(r"^(\d+)([KMGT]?)$")
_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_gres(text: str) -> tuple[Gres, ...]:
    """`Gres=` of `scontrol show node`: `gpu:a100:4(S:0-1),gpu:v100:2(S:1),mps:400`, `gpu:2`, `(null)`.

    The parenthesized part (socket affinity, or `IDX:0,2` in GresUsed) may hold commas, so the list is
    split on the commas outside parentheses. A count may carry a K/M/G/T suffix (mps:1K); none means 1.
    """
    if text in ("", "(null)", "N/A"):
        return ()
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    found = []
    for item in items:
        parts = item.split("(", 1)[0].split(":")
        count = 1
        if len(parts) > 1 and (match := _COUNT.match(parts[-1])):
            count = int(match[1]) * _SUFFIX[match[2]]
            parts = parts[:-1]
        found.append(Gres(parts[0], parts[1] if len(parts) > 1 else None, count))
    return tuple(found)


# `Key=value` pairs of a one-line scontrol record; a value runs to the next ` Key=` (OS=, Reason= hold spaces).
_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")


def parse_record(line: str) -> dict[str, str]:
    return {key: value.strip() for key, value in _FIELD.findall(line.strip())}


def parse_nodes(text: str) -> list[Node]:
    """`scontrol show node -o`: one node per line."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = parse_record(line)
        allocated = re.search(r"gres/gpu=(\d+)", f.get("AllocTRES", ""))
        nodes.append(Node(
            name=f["NodeName"],
            partitions=tuple(p for p in f.get("Partitions", "").split(",") if p),
            state=f.get("State", "UNKNOWN"),
            cpus=int(f.get("CPUTot", 0)),
            cpus_allocated=int(f.get("CPUAlloc", 0)),
            gres=parse_gres(f.get("Gres", "")),
            gpus_allocated=int(allocated[1]) if allocated else 0,
        ))
    return nodes


def nodes() -> list[Node]:
    return parse_nodes(run(["scontrol", "show", "node", "-o"]))


# ----------------------------------------------------------------------------- jobs


def parse_time(text: str) -> int:
    """A Slurm time limit (`--time`) in whole minutes, rounded up: what submitit's `timeout_min` takes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"time limit {text!r} is not a Slurm time: use {TIME_FORMATS}")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        seconds = int(first) * 60 + int(second)
    else:  # minutes
        seconds = int(first) * 60
    if seconds <= 0:
        raise ValueError(f"time limit {text!r} must be positive")
    return -(-seconds // 60)


@dataclasses.dataclass(frozen=True)
class TaskState:
    task: int | None  # the array index; None for a job that is not an array
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    reason: str  # why it is pending (JobHeldUser, BeginTime, Resources...), "None" otherwise


def parse_squeue(text: str) -> list[TaskState]:
    """`squeue -h -r -o '%i|%T|%r'`: `12` for a job, `12_3` for task 3 of array 12."""
    states = []
    for line in text.splitlines():
        if not line.strip():
            continue
        job, state, reason = line.split("|")
        _, _, index = job.partition("_")
        states.append(TaskState(int(index) if index.isdigit() else None, state, reason))
    return states


def job_states(job_id: str) -> list[TaskState]:
    """One state per task of `job_id`; [] once slurmctld has forgotten the job (it finished a while ago)."""
    try:
        out = run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i|%T|%r"])
    except SlurmError as error:
        if "Invalid job id" in str(error):
            return []
        raise
    return parse_squeue(out)


def update_job(job_id: str, **fields: str) -> None:
    """`scontrol update JobId=<id> TimeLimit=... Partition=...`: all tasks of an array at once."""
    run(["scontrol", "update", f"JobId={job_id}", *(f"{key}={value}" for key, value in fields.items())])


def release(job_id: str) -> None:
    run(["scontrol", "release", job_id])


def cancel(job_id: str) -> None:
    run(["scancel", job_id])
