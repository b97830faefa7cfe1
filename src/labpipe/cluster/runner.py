"""What a Slurm task runs: `dvc repro <stage>` in its snapshot, pinned to the submitted data.

submitit pickles a StageJob at submission and calls it on the node. It is Checkpointable: on preemption
or at the time limit, Slurm signals the job (USR2), submitit calls `checkpoint()`, which resubmits the same
StageJob, and requeues the job. There is no state to save here: the stages checkpoint themselves (atomic
files in the snapshot, e.g. artifacts/grok/checkpoints/), so the requeued `dvc repro` resumes where the
stage left off, in the same MLflow run. A job requeued without warning (`scontrol requeue`, a node
failure) runs the same StageJob again and resumes the same way.

A job of several Slurm tasks (`--nodes`, `--tasks-per-node`) runs a data-parallel stage with one rank per task
(labpipe.distributed). Rank 0 does what a single task does; the stage it starts through `dvc repro` is rank
0 of the world. The other ranks wait for rank 0 to say whether the stage runs at all (it may be up to date)
once its inputs are in place, in a file of the snapshot for this start of the job; then they run the stage's
verb themselves in the same snapshot, and join.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from labpipe import distributed, registry
from labpipe.files import write_json


class StageJob(submitit.helpers.Checkpointable):
    """Task `task` of job `job_id`: `dvc repro <stage>` in `workdir`, the task's snapshot of the commit."""

    def __init__(self, job_id: str, task: int, stage: str, workdir: str, tracking_uri: str, dvc_lock_sha256: str):
        self.job_id = job_id
        self.task = task
        self.stage = stage
        self.workdir = workdir
        self.tracking_uri = tracking_uri
        self.dvc_lock_sha256 = dvc_lock_sha256

    def __call__(self) -> dict:
        world = distributed.world()  # several Slurm tasks: exported as torchrun's variables for the stage
        env = self.environment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        rank = f" rank {world.rank} of {world.size}" if world.size > 1 else ""
        does = f"dvc repro {self.stage}" if world.main else f"{self.stage} with rank 0"
        print(f"labpipe job {self.job_id} task {self.task}{rank}: {does} in {self.workdir}"
              + (f" (restart {restarts})" if restarts else ""), flush=True)
        if not world.main:
            return self.join_rank_0(env, world, restarts)
        decision = self.decision_file(restarts)
        try:
            self.dvc(env, "checkout", "--with-deps", "--allow-missing", self.stage)
            stale = self.check_data(env)
            if world.size > 1:  # the upstream stages first: then the others know whether this one runs
                if stale:
                    self.dvc(env, "repro", *stale)
                status = json.loads(self.dvc(env, "status", "--json", self.stage, capture=True) or "{}")
                write_decision(decision, {"run": self.stage in status})
            self.dvc(env, "repro", self.stage)
        finally:
            if world.size > 1 and not decision.exists():
                write_decision(decision, {"run": False, "failed": True})
        # The stage's outputs are in the shared DVC cache now; the task's dvc.lock says which hashes.
        return {"job": self.job_id, "task": self.task, "dvc_lock": (Path(self.workdir) / "dvc.lock").read_text()}

    def decision_file(self, restarts: int) -> Path:
        return Path(self.workdir) / ".labpipe" / f"ranks-start-{restarts}.json"

    def join_rank_0(self, env: dict[str, str], world: distributed.World, restarts: int) -> dict:
        """Rank > 0: wait until rank 0 says whether the stage runs, then run its verb in the snapshot as this rank."""
        decision = self.decision_file(restarts)
        while not decision.exists():
            time.sleep(1)
        said = json.loads(decision.read_text())
        if said.get("failed"):
            raise RuntimeError(f"rank 0 failed before {self.stage} started (its log says why)")
        if said["run"]:
            self.run_in_snapshot(env, [sys.executable, "-m", "labpipe", registry.stage(self.stage).verb])
        else:
            print(f"{self.stage} is up to date: nothing for rank {world.rank} to do", flush=True)
        return {"job": self.job_id, "task": self.task, "rank": world.rank}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout, before it requeues the job: run this task again."""
        print(f"labpipe job {self.job_id} task {self.task}: checkpoint: requeued (preemption or time limit); the "
              "stage resumes from its own checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The snapshot's code, not the installed package's: `labpipe` in dvc.yaml imports from src/ first.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(self.workdir) / "src"), env.get("PYTHONPATH")]))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The project's MLflow store (not one in the snapshot), and a tag on every run the task opens, by
        # which `labpipe jobs show` finds them: MLflow adds MLFLOW_RUN_CONTEXT's tags to each new run.
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env["MLFLOW_RUN_CONTEXT"] = json.dumps({"labpipe.job_id": self.job_id, "labpipe.task": str(self.task)})
        return env

    def check_data(self, env: dict[str, str]) -> list[str]:
        """Every input of the stage at the hash the submitted dvc.lock pins? `dvc checkout` has just restored
        them from the cache; `dvc status` names the upstream stages that still differ (their outputs were
        not in the cache), which `dvc repro` then reproduces from the same code and params. Returns them."""
        status = json.loads(self.dvc(env, "status", "--with-deps", "--json", self.stage, capture=True) or "{}")
        differ = sorted(name for name in status if name != self.stage)
        if differ:
            print(f"data: {', '.join(differ)} not at the submitted dvc.lock's hashes; dvc repro reproduces them",
                  flush=True)
        else:
            print(f"data: every input of {self.stage} matches the submitted dvc.lock "
                  f"(sha256 {self.dvc_lock_sha256[:12]})", flush=True)
        return differ

    def dvc(self, env: dict[str, str], *args: str, capture: bool = False) -> str:
        return self.run_in_snapshot(env, [str(Path(sys.executable).parent / "dvc"), *args], capture)

    def run_in_snapshot(self, env: dict[str, str], command: list[str], capture: bool = False) -> str:
        """Run `command` in the snapshot; its output goes to the task's log (submitit's stdout file)."""
        # Its own process group: when submitit stops this task (preemption), the whole stage goes with it,
        # not only dvc, so that no orphaned trainer keeps writing into the snapshot.
        process = subprocess.Popen(command, cwd=self.workdir, env=env, start_new_session=True,
                                   stdout=subprocess.PIPE if capture else None, text=True)
        try:
            out, _ = process.communicate()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
        if process.returncode != 0:
            shown = " ".join([Path(command[0]).name, *command[1:]])
            raise RuntimeError(f"{shown} failed with exit code {process.returncode} (log above)")
        return out or ""


def write_decision(path: Path, decision: dict) -> None:
    """Atomically: a rank polling for the file reads it whole or not at all."""
    path.parent.mkdir(exist_ok=True)
    write_json(path, decision)
