"""The run lifecycle of every trainer (labpipe.run), tried for real through `python -m labpipe <verb>`.

One harness for all four training stages: SIGKILL at a random point and resume (bit-identical outputs, the
same MLflow run), extend a finished run (equal to a straight run), a changed param moves checkpoints aside
and brings them back, an invalid param changes nothing on disk, a code edit (not a docstring edit) starts a
new trajectory, one run per output folder, and a truncated newest checkpoint falls back to the one before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from conftest import run_labpipe
from labpipe import registry
from labpipe.checkpoint import RUN_RECORD, SUPERSEDED, Checkpoints

# stage -> (test module, its project builder: (directory, repo_params, **section overrides) -> None)
PROJECTS = {"grok_train": ("test_grok", "make_grok_project"),
            "hmm_train": ("test_hmm_stages", "make_hmm_project"),
            "lm_train": ("test_lm", "make_lm_project"),
            "crosscoder_train": ("test_crosscoder", "make_crosscoder_project")}


TRAINERS = ["grok_train", "hmm_train", "lm_train", "crosscoder_train"]
EXTENDABLE = [name for name in TRAINERS if registry.STAGES[name].training.extendable]
# a param of each trainer that changes its trajectory, and a value for it
TRAJECTORY_CHANGE = {"grok_train": "grok.lr=0.002", "hmm_train": "hmm.seed=1", "lm_train": "lm.lr=0.002",
                     "crosscoder_train": "crosscoder.lr=0.002"}
# the output whose bytes say the run's result: the best (or final) weights
RESULT = {"grok_train": "model.pt", "hmm_train": "model.pt", "lm_train": "model/model.safetensors",
          "crosscoder_train": "model.pt"}


TIMINGS = {"tokens_per_s", "epoch_seconds", "seconds"}


def labpipe(directory: Path, stage: str, *sets: str, env: dict | None = None, wait: bool = True):
    """`labpipe <verb> --set ...` in `directory`: in this process (a run costs its imports once), or in its own
    process where the test needs one (to kill it, or to import a copied package)."""
    argv = [registry.STAGES[stage].verb, *(f"--set={s}" for s in sets)]
    if env is None and wait:
        return run_labpipe(directory, argv)
    job = subprocess.Popen([sys.executable, "-m", "labpipe", *argv], cwd=directory, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if not wait:
        return job
    out, err = job.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, job.returncode, out, err)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def out_dir(directory: Path, stage: str) -> Path:
    return directory / registry.STAGES[stage].training.out_dir


def store(directory: Path, stage: str) -> Checkpoints:
    spec = registry.STAGES[stage].training
    return Checkpoints(out_dir(directory, stage) / "checkpoints", spec.unit, spec.directory_checkpoints)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` and its sha256."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run_id(directory: Path, stage: str) -> str:
    newest = store(directory, stage).resumable()[-1]
    payload = newest / "trainer_state.pt" if newest.is_dir() else newest
    import torch

    return torch.load(payload, weights_only=False)["state"]["run_id"]


@pytest.fixture
def make(tmp_path, mlflow_store, repo_params):
    """make(stage, name, **overrides) -> a project directory ready for that stage (one MLflow store for all)."""

    def make_project(stage: str, name: str = "project", **overrides) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        module, builder = PROJECTS[stage]
        getattr(importlib.import_module(module), builder)(directory, repo_params, **overrides)
        return directory

    return make_project


def rank_process(launcher: int, rank: int) -> int:
    """The pid of rank `rank` among the processes that `launcher` started (torch's elastic agent's workers)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields["PPid"]) == launcher:
                environ = (status.parent / "environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ:
                    return int(status.parent.name)
    raise AssertionError(f"no rank {rank} among the children of {launcher}")


# (stage, section overrides): every trainer killed whole; lm_train as 2 ranks, one of which is killed
KILLS = [pytest.param(stage, {}, id=stage) for stage in TRAINERS] + [
    pytest.param("lm_train", {"devices": 2, "batch_size": 8}, id="lm_train-rank-1-of-2", marks=pytest.mark.ranks)]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "overrides"), KILLS)
def test_sigkill_at_a_random_point_resumes_to_the_same_result_in_the_same_run(make, stage, overrides):
    reference, killed = make(stage, "reference", **overrides), make(stage, "killed", **overrides)
    # ranks print to the terminal, which only a process of its own captures
    finish = (lambda directory: labpipe(directory, stage, env={})) if overrides else \
        (lambda directory: labpipe(directory, stage))
    ok(finish(reference))
    total = len(store(reference, stage).all())
    rng = random.Random(stage)
    after = rng.randint(1, max(1, total - 2))  # checkpoints written before the kill
    job = labpipe(killed, stage, wait=False)
    deadline = time.time() + 300
    while len(store(killed, stage).all()) < after:
        assert job.poll() is None, job.communicate()
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next epoch or step
    if overrides:  # one rank dies: the launcher stops the other and fails, within seconds
        os.kill(rank_process(job.pid, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=120)
        assert job.returncode == 128 + signal.SIGKILL, err[-2000:]
        assert "rank 1 failed first (signal 9); the other ranks were stopped" in err
        assert time.monotonic() - killed_at < 60
    else:
        job.send_signal(signal.SIGKILL)
        job.communicate()
        assert job.returncode == -signal.SIGKILL
    done = store(killed, stage).all()
    assert len(done) < total, "the run finished before it was killed"
    opened = run_id(killed, stage)

    resumed = ok(finish(killed))
    assert f"resuming from {done[-1].relative_to(killed)}" in resumed.stdout
    result = RESULT[stage]
    assert digest(out_dir(killed, stage) / result) == digest(out_dir(reference, stage) / result)
    assert run_id(killed, stage) == opened
    assert MlflowClient().get_run(opened).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("stage", EXTENDABLE)
def test_extending_a_finished_run_equals_a_straight_run(make, stage):
    spec = registry.STAGES[stage].training
    key = f"{spec.section}.{spec.length}"
    extended, straight = make(stage, "extended"), make(stage, "straight")
    length = yaml.safe_load((straight / "params.yaml").read_text())[spec.section][spec.length]
    ok(labpipe(straight, stage))
    ok(labpipe(extended, stage, f"{key}={length // 2}"))
    first_run = run_id(extended, stage)
    longer = ok(labpipe(extended, stage))
    assert f"({spec.unit} {length // 2})" in longer.stdout  # resumed where the shorter run ended
    assert run_id(extended, stage) == first_run
    run = MlflowClient().get_run(first_run)
    assert run.data.tags[f"labpipe.changed.{key}"] == f"{length // 2} -> {length}"
    assert digest(out_dir(extended, stage) / RESULT[stage]) == digest(out_dir(straight, stage) / RESULT[stage])
    for path in out_dir(straight, stage).glob("*history.csv"):  # timings differ between any two runs
        histories = [pd.read_csv(d / path.name) for d in (out_dir(extended, stage), out_dir(straight, stage))]
        pd.testing.assert_frame_equal(*[h.drop(columns=[c for c in h if c in TIMINGS]) for h in histories])


@pytest.mark.slow
@pytest.mark.parametrize("stage", EXTENDABLE)
def test_a_run_resumed_at_its_new_length_evaluates_there_and_a_shorter_one_is_refused(make, stage):
    """Killed in the step after a checkpoint, then rerun with the length set to that checkpoint: nothing is left
    to train, and the end (off the evaluation cadence of grok and lm) is evaluated as a straight run does."""
    spec = registry.STAGES[stage].training
    key = f"{spec.section}.{spec.length}"
    every = 2  # off the evaluation cadence of grok (3) and lm (8)
    straight, killed = make(stage, "straight", checkpoint_every=every), make(stage, "killed", checkpoint_every=every)
    ok(labpipe(straight, stage, f"{key}={every}"))
    ok(labpipe(killed, stage, f"{key}={every + 1}"))
    newest = store(killed, stage).all()[-1]  # as if killed before the last checkpoint was written
    shutil.rmtree(newest) if newest.is_dir() else newest.unlink()
    rerun = ok(labpipe(killed, stage, f"{key}={every}"))
    assert f"({spec.unit} {every})" in rerun.stdout
    for name in [RESULT[stage], *(p.name for p in out_dir(straight, stage).glob("*history.csv"))]:
        if name.endswith(".csv"):
            histories = [pd.read_csv(out_dir(d, stage) / name) for d in (killed, straight)]
            pd.testing.assert_frame_equal(*[h.drop(columns=[c for c in h if c in TIMINGS]) for h in histories])
        else:
            assert digest(out_dir(killed, stage) / name) == digest(out_dir(straight, stage) / name)

    everything = snapshot(killed / "artifacts")
    shorter = labpipe(killed, stage, f"{key}={every - 1}")
    assert shorter.returncode == 2 and "Traceback" not in shorter.stderr and "resuming" not in shorter.stdout
    assert f"error: {key}={every - 1}: this run has done {every} {spec.unit}s already" in \
        shorter.stderr.strip().splitlines()[-1]
    assert snapshot(killed / "artifacts") == everything


@pytest.mark.slow
@pytest.mark.parametrize("stage", TRAINERS)
def test_a_changed_param_moves_checkpoints_aside_and_back_and_a_bad_one_changes_nothing(make, stage):
    directory = make(stage)
    ok(labpipe(directory, stage))
    checkpoints = out_dir(directory, stage) / "checkpoints"
    before = snapshot(checkpoints)
    fingerprint = json.loads((checkpoints / RUN_RECORD).read_text())["fingerprint"]

    everything = snapshot(directory / "artifacts")
    section = registry.STAGES[stage].training.section
    for bad, named in ((f"{section}.lr=.inf" if stage != "hmm_train" else "hmm.eps=0.5", section),
                       (f"{section}.checkpoint_every=0", f"{section}.checkpoint_every"),
                       (f"{section}.no_such_key=1", f"{section}.no_such_key")):
        refused = labpipe(directory, stage, bad)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert named in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert snapshot(directory / "artifacts") == everything  # not a byte changed, no file added

    changed = ok(labpipe(directory, stage, TRAJECTORY_CHANGE[stage]))
    aside = checkpoints / SUPERSEDED / fingerprint
    assert f"moved to {aside.relative_to(directory)}" in changed.stderr
    assert snapshot(aside) == before  # every checkpoint kept, byte for byte
    back = ok(labpipe(directory, stage))  # the first params again: their checkpoints come back and are resumed
    assert "are back from" in back.stderr and "resuming from" in back.stdout
    assert {k: v for k, v in snapshot(checkpoints).items() if not k.startswith(SUPERSEDED)} == before


@pytest.mark.slow
def test_a_code_edit_starts_a_new_trajectory_a_docstring_edit_does_not(make, tmp_path):
    """A finished run, then the package copied and edited: the fingerprint hashes the syntax of the stage's
    import closure (file names relative to the package), so the unedited copy would resume too."""
    directory = make("grok_train")
    ok(labpipe(directory, "grok_train"))
    source = tmp_path / "src"
    shutil.copytree(Path(registry.__file__).parent, source / "labpipe")
    env = {"PYTHONPATH": str(source)}
    models = source / "labpipe/grok/models.py"
    models.write_text(models.read_text().replace('"""Pre-norm residual MLP block', '"""A pre-norm residual block'))
    assert "resuming from" in ok(labpipe(directory, "grok_train", env=env)).stdout
    models.write_text(models.read_text().replace("return h + self.fc2(", "return h + 1.0 * self.fc2("))
    edited = ok(labpipe(directory, "grok_train", env=env))
    assert "resuming from" not in edited.stdout and "moved to" in edited.stderr


@pytest.mark.slow
def test_one_run_per_output_folder_and_a_stale_lock_is_taken_over(make):
    directory = make("grok_train", epochs=100000, checkpoint_every=1)
    first = labpipe(directory, "grok_train", wait=False)
    lock = out_dir(directory, "grok_train") / ".lock"
    deadline = time.time() + 120
    while not store(directory, "grok_train").all():  # training: past the lock and MLflow's store set-up
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = labpipe(directory, "grok_train")
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"pid {first.pid}" in second.stderr and "in use by grok_train" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert lock.exists()  # a killed run cannot clean up
    done = int(store(directory, "grok_train").all()[-1].stem.split("_")[1])
    third = ok(labpipe(directory, "grok_train", f"grok.epochs={done}"))  # ends where the killed one stopped
    assert "taking over the lock" in third.stderr and not lock.exists()


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(make):
    reference, damaged = make("grok_train", "reference"), make("grok_train", "damaged")
    ok(labpipe(reference, "grok_train"))
    ok(labpipe(damaged, "grok_train", "grok.epochs=8"))
    newest = store(damaged, "grok_train").all()[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = ok(labpipe(damaged, "grok_train"))
    assert f"checkpoint {newest.relative_to(damaged)} is unreadable" in resumed.stderr
    assert "resuming from artifacts/grok/checkpoints/epoch_00000004.pt" in resumed.stdout
    assert (newest.parent / "unreadable" / newest.name).exists()  # kept, aside
    assert digest(out_dir(damaged, "grok_train") / "model.pt") == digest(out_dir(reference, "grok_train") / "model.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "said"), [(signal.SIGTERM, "terminated (SIGTERM)"),
                                              (signal.SIGINT, "interrupted (Ctrl-C)")], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_marks_the_run_killed_and_changes_no_output(make, signum, said):
    """scancel, docker stop, kill, Ctrl-C: the run unwinds, MLflow says KILLED, the outputs stay those of the
    last success."""
    directory = make("grok_train")
    ok(labpipe(directory, "grok_train"))
    outputs = {k: v for k, v in snapshot(out_dir(directory, "grok_train")).items() if "checkpoints" not in k}
    finished = store(directory, "grok_train").all()[-1]
    job = labpipe(directory, "grok_train", "grok.epochs=100000", wait=False)  # extends the finished run
    deadline = time.time() + 120
    while store(directory, "grok_train").all()[-1] == finished:
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.02)
    job.send_signal(signum)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signum and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"labpipe grok-train: {said}: outputs left as they were"
    assert {k: v for k, v in snapshot(out_dir(directory, "grok_train")).items() if "checkpoints" not in k} == outputs
    assert MlflowClient().get_run(run_id(directory, "grok_train")).info.status == "KILLED"
    assert not (out_dir(directory, "grok_train") / ".lock").exists()
