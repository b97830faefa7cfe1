"""One run per output folder: a lock file that names its holder.

`output_lock(folder, stage)` creates `<folder>/.lock` exclusively (pid, host, process start time, stage, Slurm
job); a second run exits with BusyError naming the holder. A lock whose process is gone (same host, the pid
dead or reused by another process), or that a requeued Slurm job left behind, is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from labpipe.errors import BusyError

LOCK = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the name in parentheses may hold spaces


def _holder() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _start_time(pid),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)}


def _is_stale(holder: dict) -> bool:
    """True when the holder is certainly gone: its process on this host has exited (or its pid now belongs to
    another process), or it is an earlier run of this very Slurm job (requeued, perhaps on another node)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: we cannot tell, so it holds
    return _start_time(int(holder.get("pid", -1))) != holder.get("process_start")


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"{holder.get('stage', '?')} (pid {holder.get('pid')} on {holder.get('host')}{job}, "
            f"started {holder.get('started')})")


@contextlib.contextmanager
def output_lock(folder: str | Path, stage: str) -> Iterator[None]:
    path = Path(folder) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {**_holder(), "stage": stage}
    for _attempt in range(2):
        try:
            with open(path, "x") as f:
                json.dump(me, f)
            break
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}  # a lock half-written by a killed process
            if holder and not _is_stale(holder):
                raise BusyError(f"{folder} is in use by {describe(holder)}; wait for it to finish, or stop it "
                                f"(if it is gone for sure, delete {path})") from None
            print(f"warning: taking over the lock of {describe(holder) if holder else 'an unreadable holder'} "
                  f"on {folder}: that process is gone", file=sys.stderr)
            path.unlink(missing_ok=True)
    else:
        raise BusyError(f"{folder}: another run took the lock at the same moment; try again")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
