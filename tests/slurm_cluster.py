"""A real single-node Slurm cluster for the tests: this machine, its CPUs, one partition, torn down after.

Debian's `slurm-wlm` and `munge` (`make test-slurm` installs them when `slurmctld` is missing). Everything is
private to a temp directory: munged with its own key and socket, slurmctld and slurmd on free ports, state,
spool and logs; the daemons are found and stopped by their pid files. No slurmdbd, so no `sacct`: job state
comes from squeue (labpipe.cluster.slurm), and submitit's sacct calls only warn.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import stop_by_pid_file

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"


def missing() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    absent = [name for name in (*DAEMONS, "sbatch", "squeue") if shutil.which(name) is None]
    if absent:
        return f"needs slurm-wlm and munge ({', '.join(absent)} not found): make test-slurm installs them"
    if os.geteuid() != 0:
        return "the single-node Slurm runs its daemons as root (SlurmUser=root)"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def slurm_conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path) -> str:
    return f"""\
ClusterName=labpipe-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def single_node_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under `root`; yields the environment clients need (SLURM_CONF)."""
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge = root / "munge"
    munge.chmod(0o700)  # munged refuses key and socket directories others may write to
    (munge / "munge.key").write_bytes(os.urandom(1024))
    (munge / "munge.key").chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, os.cpu_count() or 1, *_free_ports(2), munge / "munge.socket"))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = {"munged": munge / "munged.pid", "slurmctld": root / "slurmctld.pid", "slurmd": root / "slurmd.pid"}
    try:
        subprocess.run(["munged", "--force", f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                        f"--pid-file={pid_files['munged']}", f"--log-file={munge / 'munged.log'}",
                        f"--seed-file={munge / 'munged.seed'}"], check=True)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        _wait_until_idle(env, root)
        yield env
    finally:
        _cancel_all(env)
        for name in reversed(DAEMONS):
            stop_by_pid_file(pid_files[name], 15)


def _wait_until_idle(env: dict[str, str], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
        if done.returncode == 0 and done.stdout.strip() == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((root / "log").glob("*.log")))
    raise RuntimeError(f"the single-node Slurm did not come up in {timeout:.0f} s:\n{logs}")


def _cancel_all(env: dict[str, str], timeout: float = 30) -> None:
    """Jobs outlive slurmd (their slurmstepd stays): cancel them and wait until they are gone."""
    subprocess.run(["scancel", "--user", "root"], capture_output=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env)
        if done.returncode != 0 or not done.stdout.strip():
            return
        time.sleep(0.5)


def squeue(env: dict[str, str], job_id: str, fields: str = "%i|%T|%r|%l") -> list[list[str]]:
    """One row per task of `job_id`, straight from Slurm (the tests' independent view)."""
    done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", fields],
                          capture_output=True, text=True, env=env, check=True)
    return [line.split("|") for line in done.stdout.splitlines()]


def wait_for(condition, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
