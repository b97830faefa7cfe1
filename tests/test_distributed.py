"""Data-parallel lm_train (labpipe.distributed) for real: gloo ranks started by torchrun and by lm.devices.

The ranks must train what one process trains on the same step batch (to float rounding), read disjoint
shares of every batch, and leave one MLflow run and one set of checkpoints, written by rank 0. Killing one
rank is tried by the run-lifecycle harness (test_lifecycle.py), a Slurm job of two tasks by test_cluster.py.
The runs of several ranks are marked `ranks` (make test-ranks).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import run_labpipe
from labpipe import distributed, registry
from labpipe.distributed import World, share
from labpipe.lm.data import ShardDataset, epoch_loader
from labpipe.synth.manifest import load_manifest
from test_lm import make_lm_project, shard_rows, write_dataset

STEPS = 20


def test_the_shares_of_a_batch_are_disjoint_in_order_and_cover_it():
    for rows in range(0, 40):
        for size in range(1, 6):
            shares = [range(rows)[share(rows, World(rank, size))] for rank in range(size)]
            assert [i for part in shares for i in part] == list(range(rows))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_over_an_epoch_the_ranks_read_every_row_once_and_together_the_single_process_order(project):
    """60 rows in batches of 16: the last batch of 12 rows; with 3 ranks, shares of 5/5/6 and 4/4/4 rows."""
    write_dataset(rows=20, train_shards=3)
    train = ShardDataset(load_manifest(), "train")
    single = list(epoch_loader(train, 16, seed=4))
    for size in (2, 3):
        per_rank = [list(epoch_loader(train, 16, seed=4, world=World(rank, size))) for rank in range(size)]
        read = torch.cat([rows for batches in per_rank for rows in batches]).numpy()
        everything = shard_rows("train")
        assert sorted(map(tuple, read)) == sorted(map(tuple, everything))  # each row once
        for step, batch in enumerate(single):
            assert torch.equal(torch.cat([batches[step] for batches in per_rank]), batch)


def test_rank_and_world_come_from_torchrun_or_from_slurm(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # world() exports torchrun's variables: not for later tests
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.world() == distributed.SINGLE and not distributed.launched()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a job of one task is one rank
    assert distributed.world() == distributed.SINGLE and not distributed.launched()
    with monkeypatch.context() as torchrun:
        for key, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
            torchrun.setenv(key, value)
        assert distributed.world() == World(3, 8, 1) and distributed.launched()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
             "SLURM_LOCALID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.launched()
    assert distributed.world() == World(5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu07"  # the job's first node
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")


# ----------------------------------------------------------------------------- real ranks


def train(directory: Path, *sets: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    """`labpipe lm-train --set ...` in its own process (ranks write to the terminal, which run_labpipe does not
    capture), or as `torchrun` ranks (python -m torch.distributed.run is torchrun)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "labpipe", "lm-train", *(f"--set={s}" for s in sets)], cwd=directory,
                          capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.ranks
def test_two_ranks_train_what_one_process_trains_and_rank_0_alone_writes(tmp_path, mlflow_store, repo_params):
    """Step batch 16 four ways: one process 1 x 16 and 2 x 8 (accumulated), two ranks of one pass of 8 each
    started by torchrun and by lm.devices=2. Same losses within 1e-5 relative, same weights to float rounding;
    each run one MLflow run and one set of checkpoints."""
    ways = {"one pass": ("lm.batch_size=16", "lm.grad_accum_steps=1"),
            "accumulated": ("lm.batch_size=8", "lm.grad_accum_steps=2"),
            "torchrun": ("lm.batch_size=8", "lm.grad_accum_steps=2"),
            "lm.devices": ("lm.batch_size=16", "lm.grad_accum_steps=1", "lm.devices=2")}
    losses, weights, directories = {}, {}, {}
    for way, sets in ways.items():
        directory = directories[way] = tmp_path / way.replace(" ", "-").replace(".", "-")
        directory.mkdir()
        make_lm_project(directory, repo_params, max_steps=STEPS, decay_steps=STEPS)
        if way == "torchrun":
            result = ok(train(directory, *sets, torchrun=2))
        elif way == "lm.devices":
            result = ok(train(directory, *sets))
        else:  # one process: in this one
            result = ok(run_labpipe(directory, ["lm-train", *(f"--set={s}" for s in sets)]))
        out = directory / "artifacts/lm"
        losses[way] = pd.read_csv(out / "history.csv").train_loss.to_numpy()
        weights[way] = load_file(out / f"checkpoints/step_{STEPS:08d}/model.safetensors")
        checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("step_", ".")))
        assert checkpoints == [f"step_{step:08d}" for step in range(4, STEPS + 1, 4)], way  # written once each
        if way == "lm.devices":
            assert "starting 2 ranks" in result.stdout
    for way in ("accumulated", "torchrun", "lm.devices"):
        np.testing.assert_allclose(losses[way], losses["one pass"], rtol=1e-5, err_msg=way)
        for name, tensor in weights["one pass"].items():
            torch.testing.assert_close(weights[way][name], tensor, rtol=1e-4, atol=1e-6, msg=f"{way}: {name}")
    assert len(losses["one pass"]) == STEPS and losses["one pass"][-1] < losses["one pass"][0]  # it trained

    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.line_of("lm_train").experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'lm_train'")
    assert len(runs) == len(ways)  # one per run, whatever the ranks
    ranks = sorted(run.data.tags["ranks"] for run in runs)
    assert ranks == ["1", "1", "2", "2"]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(len(client.get_metric_history(run.info.run_id, "train_loss")) == STEPS // 4 for run in runs)

    # A refusal on rank 0 (a run length below the steps done) stops every rank with rank 0's line.
    refused = train(directories["lm.devices"], *ways["lm.devices"], "lm.max_steps=8")
    assert refused.returncode == 2
    assert refused.stderr.count(f"this run has done {STEPS} steps already") == 2  # each rank says it once
    assert re.search(r"rank [01] failed first \(exit code 2\)", refused.stderr)
    assert "Traceback" not in refused.stderr


@pytest.mark.ranks
def test_without_a_launcher_the_rank_whose_peer_died_stops_with_one_line(tmp_path, mlflow_store, repo_params):
    """Ranks started as Slurm starts them, with no agent to stop the survivor: rank 1 is SIGKILLed mid-run;
    rank 0's next collective fails and it exits 1 with one line, in seconds, not at the collective timeout."""
    make_lm_project(tmp_path, repo_params, max_steps=5000, decay_steps=5000, checkpoint_every=100)
    port = str(20000 + os.getpid() % 20000)
    ranks = [subprocess.Popen([sys.executable, "-m", "labpipe", "lm-train"], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    checkpoints = tmp_path / "artifacts/lm/checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step_*")):  # training, past its first checkpoint
        assert ranks[0].poll() is None and time.monotonic() < deadline, ranks[0].communicate()
        time.sleep(0.1)
    ranks[1].kill()
    killed_at = time.monotonic()
    _, err = ranks[0].communicate(timeout=120)
    ranks[1].communicate()
    assert ranks[0].returncode == 1, err[-2000:]
    assert time.monotonic() - killed_at < 60
    [line] = [line for line in err.splitlines() if line.startswith("labpipe lm-train: error:")]
    assert line.startswith("labpipe lm-train: error: rank 0 of 2: a collective failed, another rank stopped"), err
    assert "Traceback" not in err
    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.line_of("lm_train").experiment)
    [run] = client.search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'lm_train'")
    assert run.info.status == "FAILED"
