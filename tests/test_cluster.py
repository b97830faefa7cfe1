"""labpipe jobs and labpipe accelerators: parsers on recorded outputs, refusals, DVC's real queue, and (marked
`slurm`) a real single-node Slurm cluster started by a fixture (tests/slurm_cluster.py)."""

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

import slurm_cluster
from conftest import REPO, copy_project, tiny_params, write_params
from labpipe import registry as lines
from labpipe.cluster import accelerators, capture, jobs, local, registry, slurm

# ----------------------------------------------------------------------------- recorded outputs

# `scontrol show node -o` of a GPU cluster (Slurm 22.05): typed GPUs with socket affinity, two GPU types on one
# node, a drained CPU node whose Reason holds spaces.
GPU_CLUSTER_NODES = (
    "NodeName=gpu-a01 Arch=x86_64 CoresPerSocket=32 CPUAlloc=24 CPUEfctv=64 CPUTot=64 CPULoad=18.52 "
    "AvailableFeatures=a100,ib ActiveFeatures=a100,ib Gres=gpu:a100:4(S:0-1) NodeAddr=gpu-a01 "
    "NodeHostName=gpu-a01 Version=22.05.8 OS=Linux 5.15.0-91-generic #101-Ubuntu SMP Tue Nov 14 13:30:08 "
    "UTC 2023 RealMemory=515000 AllocMem=196608 FreeMem=301234 Sockets=2 Boards=1 State=MIXED "
    "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu,preempt "
    "BootTime=2024-01-08T09:12:44 SlurmdStartTime=2024-01-08T09:14:02 LastBusyTime=2024-01-15T11:02:31 "
    "CfgTRES=cpu=64,mem=515000M,billing=64,gres/gpu=4,gres/gpu:a100=4 "
    "AllocTRES=cpu=24,mem=192G,gres/gpu=3,gres/gpu:a100=3 CapWatts=n/a CurrentWatts=0 AveWatts=0 "
    "ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n"
    "NodeName=gpu-b01 Arch=x86_64 CoresPerSocket=16 CPUAlloc=0 CPUEfctv=32 CPUTot=32 CPULoad=0.02 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:v100:2(S:0),gpu:t4:1(S:1) NodeAddr=gpu-b01 "
    "NodeHostName=gpu-b01 Version=22.05.8 OS=Linux 5.15.0-91-generic #101-Ubuntu SMP Tue Nov 14 13:30:08 "
    "UTC 2023 RealMemory=257000 AllocMem=0 FreeMem=250112 Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 "
    "TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu BootTime=2024-01-08T09:12:50 "
    "SlurmdStartTime=2024-01-08T09:14:05 LastBusyTime=2024-01-15T08:41:00 "
    "CfgTRES=cpu=32,mem=257000M,billing=32,gres/gpu=3,gres/gpu:t4=1,gres/gpu:v100=2 AllocTRES= "
    "CapWatts=n/a CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n"
    "NodeName=cpu-001 Arch=x86_64 CoresPerSocket=24 CPUAlloc=0 CPUEfctv=48 CPUTot=48 CPULoad=N/A "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=cpu-001 NodeHostName=cpu-001 "
    "Version=22.05.8 OS=Linux 5.15.0-91-generic #101-Ubuntu SMP Tue Nov 14 13:30:08 UTC 2023 "
    "RealMemory=191000 AllocMem=0 FreeMem=N/A Sockets=2 Boards=1 State=DOWN+DRAIN ThreadsPerCore=1 "
    "TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=cpu BootTime=None SlurmdStartTime=None "
    "LastBusyTime=2024-01-15T10:00:00 CfgTRES=cpu=48,mem=191000M,billing=48 AllocTRES= CapWatts=n/a "
    "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s Reason=Not "
    "responding [slurm@2024-01-15T10:00:00]\n"
)

# The same command on this machine's single-node test cluster (slurm-wlm 22.05.8, no GPU; note the double spaces).
THIS_MACHINE_NODE = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=3.31 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm "
    "Version=22.05.8 OS=Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1 AllocMem=0 "
    "FreeMem=18835 Sockets=2 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A "
    "MCS_label=N/A Partitions=debug  BootTime=2026-11-25T00:17:21 SlurmdStartTime=2026-11-25T04:49:49 "
    "LastBusyTime=2026-11-25T04:49:49 CfgTRES=cpu=2,mem=1M,billing=2 AllocTRES= CapWatts=n/a "
    "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n"
)


@pytest.mark.parametrize("text, expected", [
    ("gpu:a100:4(S:0-1)", [("gpu", "a100", 4)]),
    ("gpu:v100:2(S:0),gpu:t4:1(S:1)", [("gpu", "v100", 2), ("gpu", "t4", 1)]),
    ("gpu:8", [("gpu", None, 8)]),
    ("gpu:tesla:2,mps:200", [("gpu", "tesla", 2), ("mps", None, 200)]),
    ("gpu:a100:2(IDX:0,2),shard:a100:1K", [("gpu", "a100", 2), ("shard", "a100", 1024)]),  # GresUsed's style
    ("gpu", [("gpu", None, 1)]),
    ("(null)", []),
    ("", []),
])
def test_gres_is_parsed_with_types_counts_and_socket_affinity(text, expected):
    assert [(g.name, g.type, g.count) for g in slurm.parse_gres(text)] == expected


def test_nodes_from_scontrol_show_node():
    a01, b01, cpu = slurm.parse_nodes(GPU_CLUSTER_NODES)
    assert (a01.name, a01.partitions, a01.state, a01.gpus, a01.gpus_allocated) == ("gpu-a01", ("gpu", "preempt"),
                                                                                   "MIXED", 4, 3)
    assert (a01.cpus, a01.cpus_allocated) == (64, 24)
    assert b01.gpus == 3 and b01.gpus_allocated == 0 and [g.type for g in b01.gres] == ["v100", "t4"]
    assert cpu.gpus == 0 and cpu.state == "DOWN+DRAIN"
    reason = slurm.parse_record(GPU_CLUSTER_NODES.splitlines()[2])["Reason"]
    assert reason == "Not responding [slurm@2024-01-15T10:00:00]"
    assert slurm.parse_record(GPU_CLUSTER_NODES.splitlines()[0])["OS"].startswith("Linux 5.15.0-91-generic #101")
    lines = accelerators.format_nodes([a01, b01, cpu])
    assert "3/4 (4x a100)" in lines[1] and "0/3 (2x v100, 1x t4)" in lines[2] and lines[3].endswith("none")

    [vm] = slurm.parse_nodes(THIS_MACHINE_NODE)
    assert (vm.name, vm.partitions, vm.state, vm.cpus, vm.gres, vm.gpus) == ("vm", ("debug",), "IDLE", 2, (), 0)


def test_accelerators_says_which_nodes_a_multi_node_request_would_get(capsys):
    import argparse

    nodes = slurm.parse_nodes(GPU_CLUSTER_NODES)

    def request(**asked) -> tuple[int, str]:
        capsys.readouterr()
        code = accelerators.print_request(argparse.Namespace(**{"partition": "gpu", "tasks_per_node": None, **asked}),
                                          nodes)
        return code, capsys.readouterr().out

    code, out = request(nodes=2, gpus_per_node=4)  # only gpu-a01 has 4 GPUs
    assert code == 1 and "(8 ranks) in partition gpu: 1 node(s) fit (gpu-a01), 0 of them free now" in out
    assert "refused" in out
    code, out = request(nodes=1, gpus_per_node=2)  # gpu-a01 has 1 GPU free, gpu-b01 all 3
    assert code == 0 and "2 node(s) fit (gpu-a01, gpu-b01), 1 of them free now" in out and "start now" in out
    code, out = request(nodes=2, gpus_per_node=2)
    assert code == 0 and "wait in the queue" in out
    code, out = request(nodes=1, gpus_per_node=0, tasks_per_node=40, partition="cpu")  # drained: fits, not free
    assert code == 0 and "1 node(s) fit (cpu-001), 0 of them free now" in out


def test_squeue_rows_and_time_limits():
    rows = slurm.parse_squeue("12_0|RUNNING|None\n12_1|PENDING|JobHeldUser\n")
    assert [(r.task, r.state, r.reason) for r in rows] == [(0, "RUNNING", "None"), (1, "PENDING", "JobHeldUser")]
    assert slurm.parse_squeue("7|COMPLETED|None")[0].task is None
    for text, minutes in (("90", 90), ("5:30", 6), ("1:00:00", 60), ("2-0", 2880), ("1-12:30", 2190),
                          ("0-0:0:59", 1)):
        assert slurm.parse_time(text) == minutes, text
    for bad in ("1h", "", "0", "1:2:3:4", "-5"):
        with pytest.raises(ValueError, match="Slurm time|positive"):
            slurm.parse_time(bad)


def test_dvc_queue_status_and_nvidia_smi_outputs():
    queue = local.parse_status("Task     Name    Created    Status\n7e7b160  j-0     04:36 AM   Success\n"
                               "a57ff74  j-1     Nov 24, 2025   Queued\n\nWorker status: 1 active, 1 idle\n")
    assert queue.tasks == {"j-0": "Success", "j-1": "Queued"} and queue.workers == 2
    assert local.parse_status("Task  Name  Created  Status\n\nWorker status: 0 active, 0 idle").workers == 0
    gpus = accelerators.parse_nvidia_smi("0, NVIDIA A100-SXM4-80GB, 81920, 1024, 35\n1, NVIDIA A100-SXM4-80GB, "
                                         "81920, 0, [N/A]\n")
    assert [(g.name, g.memory_gib, g.used_gib, g.utilization) for g in gpus] == [
        ("NVIDIA A100-SXM4-80GB", 80.0, 1.0, "35%"), ("NVIDIA A100-SXM4-80GB", 80.0, 0.0, "")]


def test_accelerators_here_names_the_gpus_or_says_why_there_are_none(capsys):
    import torch

    assert accelerators.main([]) == 0
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert "CUDA GPU(s)" in out and "cuda:0" in out
    elif torch.version.cuda is None:
        assert out.strip() == f"here: no CUDA GPU visible (torch {torch.__version__} CPU build)"


# ----------------------------------------------------------------------------- a tiny project


def make_project(directory: Path, repo_params: dict, marker: str = "") -> Path:
    """The files a fresh clone has (tracked, or new and not ignored, no stage outputs), tiny params, one
    commit; `marker` is printed by the committed grok package, so a job's log shows which code ran."""
    copy_project(directory)
    repo_params["mheight"].update({"n": [9], "k": [4, 5], "samples_per_group": 10, "train_per_group": 5,
                                   "val_per_group": 5, "test_per_group": 0, "workers": 1})
    repo_params["grok"].update({"width": 8, "blocks": 1, "batch_size": 16, "epochs": 6, "val_every": 3,
                                "checkpoint_every": 3, "device": "cpu"})
    write_params(directory, repo_params)
    if marker:
        with open(directory / "src/labpipe/grok/__init__.py", "a") as f:
            f.write(f"print({marker!r}, flush=True)\n")
    (directory / "data").mkdir()
    git(directory, "init", "-q", "-b", "main")
    git(directory, "config", "user.name", "labpipe tests")
    git(directory, "config", "user.email", "tests@labpipe")
    commit(directory, "tiny project")
    return directory


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True).stdout.strip()


def commit(directory: Path, message: str) -> None:
    git(directory, "add", "-A")
    git(directory, "commit", "-qm", message)


def labpipe_jobs(capsys, *argv: str) -> tuple[int, str, str]:
    """`labpipe jobs ...` in this process (cwd: the project), with what it printed."""
    capsys.readouterr()
    code = jobs.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, repo_params) -> Path:
    project = make_project(tmp_path / "project", repo_params)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    return project


# ----------------------------------------------------------------------------- refusals


def test_zip_lists_pair_up_and_cross_the_sweep_grid():
    """The seed's NUM_STATES and BATCH_SIZES arrays, paired, at each K of a --sweep."""
    tasks = capture.resolve_tasks(REPO / "params.yaml", ["hmm.epochs=2"], ["hmm.vocab_size=100,200"],
                                  ["hmm.hidden_states=100,200,300", "hmm.batch_size=1024,256,128"])
    assert [(p["hmm"]["hidden_states"], p["hmm"]["batch_size"], p["hmm"]["vocab_size"]) for _, p in tasks] == [
        (100, 1024, 100), (100, 1024, 200), (200, 256, 100), (200, 256, 200), (300, 128, 100), (300, 128, 200)]
    assert tasks[2][0] == ["hmm.epochs=2", "hmm.hidden_states=200", "hmm.batch_size=256", "hmm.vocab_size=100"]
    assert all(p["hmm"]["epochs"] == 2 for _, p in tasks)


def test_bad_submissions_are_refused_before_anything_is_submitted(tiny_project, capsys, monkeypatch):
    import torch

    refused = [
        (["submit", "no_such_stage"], "unknown stage 'no_such_stage': the stages of dvc.yaml are corpus"),
        (["submit", "grok_train", "--set", "grok.no_such_key=1"], "unknown key 'grok.no_such_key'"),
        (["submit", "grok_train", "--sweep", "grok.weight_decay=0.1,zero"], "grok.weight_decay must be float"),
        (["submit", "grok_train", "--sweep", "grok.weight_decay"], "is not of the form section.key=value1,value2"),
        (["submit", "hmm_train", "--zip", "hmm.hidden_states=16,32", "--zip", "hmm.batch_size=64"],
         "--zip lists must be equally long: hmm.hidden_states has 2, hmm.batch_size has 1"),
        (["submit", "hmm_train", "--zip", "hmm.batch_size=8,16", "--sweep", "hmm.batch_size=32"],
         "hmm.batch_size is swept twice (in --sweep or --zip): give each key once"),
        (["submit", "hmm_train", "--zip", "hmm.update_freq=1,-1"], "hmm.update_freq must be >= 0"),
        (["submit", "grok_train", "--partition", "gpu"], "--partition and --time are Slurm's"),
        (["submit", "grok_train", "--executor", "slurm", "--time", "1h"], "is not a Slurm time"),
        (["submit", "grok_train", "--executor", "slurm", "--nodes", "2"],
         "--nodes/--tasks-per-node: grok_train trains in one process; several ranks are for lm_train"),
        (["submit", "lm_train", "--tasks-per-node", "2"],
         "--nodes and --tasks-per-node are Slurm's: on this machine the ranks are lm.devices"),
        (["submit", "lm_train", "--executor", "slurm", "--nodes", "0"], "--nodes 0: give at least 1"),
        (["submit", "lm_train"], "lm_train reads the synthetic shards in synth.out_dir=artifacts/synth/shards, "
                                 "inside the project: a job runs in a snapshot of the commit"),
        (["show", "nope"], "no job 'nope'"),
        (["cancel", "nope"], "no job 'nope'"),
    ]
    if not torch.cuda.is_available():
        refused.append((["submit", "grok_train", "--gpus", "1"],
                        "--gpus 1 with the local executor, but here: no CUDA GPU visible"))
    for argv, message in refused:
        code, _, err = labpipe_jobs(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)

    # No Slurm here (its commands not on PATH): refused as well.
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(Path(sys.executable).parent))
        code, _, err = labpipe_jobs(capsys, "submit", "grok_train", "--executor", "slurm")
    assert code == 2 and "--executor slurm: no Slurm here: `sinfo` is not on PATH" in err, err

    # A dirty tree: refused unless --allow-dirty.
    with open(tiny_project / "dvc.yaml", "a") as f:
        f.write("\n")
    code, _, err = labpipe_jobs(capsys, "submit", "grok_train", "--hold")
    assert code == 2 and "uncommitted changes in tracked files (dvc.yaml)" in err and "--allow-dirty" in err

    # --allow-dirty captures the tree as it is, as a commit object, without touching the tree or the stash.
    code = capture.capture_code(tiny_project, allow_dirty=True)
    assert code["dirty"] and code["commit"] == git(tiny_project, "rev-parse", "HEAD") != code["snapshot"]
    snapshot_file = subprocess.run(["git", "show", f"{code['snapshot']}:dvc.yaml"], cwd=tiny_project,
                                   capture_output=True, text=True, check=True).stdout
    assert snapshot_file == (tiny_project / "dvc.yaml").read_text()
    assert git(tiny_project, "stash", "list") == "" and "M dvc.yaml" in git(tiny_project, "status", "--short")

    assert registry.load_all(tiny_project) == []
    assert local.status(tiny_project).tasks == {}  # nothing reached DVC's queue either


# ----------------------------------------------------------------------------- local jobs: DVC's real queue


@pytest.mark.slow
def test_local_job_is_queued_modified_released_and_tracked(tiny_project, capsys):
    """A sweep of two queued DVC experiments: held, modified (removed and queued again with a new --set),
    released, run by DVC's worker; their MLflow runs are found by their experiment names."""
    code, out, _ = labpipe_jobs(capsys, "submit", "mheight-data", "--sweep", "mheight.seed=1,2", "--hold",
                                "--jobs", "2")
    assert code == 0 and "2 task(s), to DVC's experiment queue (held" in out
    [record] = registry.load_all(tiny_project)
    assert record.executor == "local" and record.stage == "mheight_data"
    assert record.code == {"commit": git(tiny_project, "rev-parse", "HEAD"), "dirty": False,
                           "snapshot": git(tiny_project, "rev-parse", "HEAD")}
    assert record.data["dvc_lock_sha256"] == hashlib.sha256((tiny_project / "dvc.lock").read_bytes()).hexdigest()
    assert [t.params["mheight"]["seed"] for t in record.tasks] == [1, 2]
    assert [t.name for t in record.tasks] == [f"{record.id}-0", f"{record.id}-1"]
    assert git(tiny_project, "status", "--porcelain") == ""  # .labpipe/ ignores itself

    code, out, _ = labpipe_jobs(capsys, "list")
    assert code == 0 and "QUEUED x2" in out
    # Slurm's flags make no sense for a local job; --set does.
    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--time", "10")
    assert code == 2 and "--time and --partition are Slurm's" in err
    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--set", "mheight.nope=3")
    assert code == 2 and "unknown key 'mheight.nope'" in err
    code, out, _ = labpipe_jobs(capsys, "modify", record.id[:20], "--set", "mheight.samples_per_group=4")
    assert code == 0 and "queued again with mheight.samples_per_group=4" in out
    record = registry.find(tiny_project, record.id)
    assert record.tasks[1].overrides == ["mheight.seed=2", "mheight.samples_per_group=4"]
    assert record.tasks[1].params["mheight"]["samples_per_group"] == 4

    assert labpipe_jobs(capsys, "release", record.id)[0] == 0
    slurm_cluster.wait_for(lambda: local.status(tiny_project).workers == 2, timeout=60, interval=0.2,
                           what="--jobs 2: two DVC queue workers")
    code, out, _ = labpipe_jobs(capsys, "follow", record.id, "--interval", "0.5")  # returns when both have ended
    assert code == 0 and out.rstrip().endswith(f"job {record.id} ended: SUCCESS x2"), out[-2000:]
    assert jobs.task_states(registry.find(tiny_project, record.id)) == ["SUCCESS"] * 2
    for task in (0, 1):  # its log as it came (DVC's), and its MLflow run
        assert re.search(rf"^task {task} \| Running stage 'mheight_data'", out, re.M), out[-3000:]
        assert re.search(rf"^task {task}: mlflow run \w+ mheight_data FINISHED", out, re.M), out[-3000:]

    code, out, _ = labpipe_jobs(capsys, "show", record.id, "--lines", "3")
    assert code == 0 and out.count("mlflow run ") == 2 and "rows=28" in out  # 7 groups x 4 codes
    # the environment: recorded at submission (this venv), on every run, the same: nothing flagged
    installed = sorted(f"{d.metadata['Name'].lower()}=={d.version}" for d in importlib.metadata.distributions()
                       if d.metadata["Name"].lower() != "labpipe")
    assert record.environment["packages"] == installed and record.environment["torch"] == torch.__version__
    assert record.environment["packages_sha256"] == hashlib.sha256("\n".join(installed).encode()).hexdigest()
    assert f"torch {torch.__version__}, {len(installed)} packages" in out and "another environment" not in out
    ran = record.environment["packages_sha256"]
    record.environment = {**record.environment, "torch": "2.0.0+cu118", "packages_sha256": "0" * 64}
    registry.save(record)  # as if submitted from another venv
    code, out, _ = labpipe_jobs(capsys, "show", record.id)
    assert out.count(f"ran under another environment than submitted: torch {torch.__version__} (submitted "
                     f"2.0.0+cu118), packages_sha256 {ran} (submitted {'0' * 64})") == 2
    assert registry.find(tiny_project, record.id).environment == record.environment  # the record round-trips
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id],
                              f"tags.`dvc.exp_name` LIKE '{record.id}-%'")
    assert sorted(r.data.params["mheight.seed"] for r in runs) == ["1", "2"]
    assert {r.data.params["mheight.samples_per_group"] for r in runs} == {"4"}

    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--set", "mheight.seed=5")
    assert code == 2 and "only queued tasks can be modified" in err and "is Success" in err
    code, out, _ = labpipe_jobs(capsys, "cancel", record.id)
    assert code == 0 and "nothing to cancel (SUCCESS x2)" in out


def test_a_held_local_job_is_cancelled_out_of_the_queue(tiny_project, capsys):
    assert labpipe_jobs(capsys, "submit", "mheight_data", "--hold")[0] == 0
    [record] = registry.load_all(tiny_project)
    assert local.status(tiny_project).tasks == {record.tasks[0].name: "Queued"}
    code, out, _ = labpipe_jobs(capsys, "cancel", record.id)
    assert code == 0 and "cancelled 1 task(s)" in out
    assert local.status(tiny_project).tasks == {}
    assert jobs.task_states(registry.find(tiny_project, record.id)) == ["CANCELLED"]


# ----------------------------------------------------------------------------- Slurm (marked: make test-slurm)

MARKER = "labpipe grok package of the test project's commit"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := slurm_cluster.missing():
        pytest.skip(reason)
    with slurm_cluster.single_node_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.fixture(scope="module")
def slurm_project(tmp_path_factory, cluster):
    """A tiny project whose m-height data is already made (`dvc repro mheight_subsample`, lock committed),
    so that the jobs' snapshots restore it from the DVC cache instead of making it again."""
    params = yaml.safe_load((REPO / "params.yaml").read_text().replace(": off", ': "off"'))
    project = make_project(tmp_path_factory.mktemp("slurm-project") / "project", params, marker=MARKER)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    done = subprocess.run(["dvc", "repro", "mheight_subsample"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    commit(project, "m-height data")
    return project


@pytest.fixture
def in_slurm_project(slurm_project, cluster, monkeypatch):
    monkeypatch.chdir(slurm_project)
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{slurm_project / 'mlflow.db'}")
    return slurm_project


def newest_job(project: Path) -> registry.JobRecord:
    return registry.load_all(project)[-1]


def wait_until_done(record: registry.JobRecord, timeout: float) -> list[str]:
    finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    return slurm_cluster.wait_for(lambda: (s := jobs.task_states(record)) and all(x in finished for x in s) and s,
                                  timeout=timeout, interval=1, what=f"job {record.id} to finish")


@pytest.mark.slurm
def test_slurm_held_job_is_listed_modified_while_pending_and_cancelled(in_slurm_project, cluster, capsys):
    project = in_slurm_project
    # Refused before submission: a partition Slurm does not know, GPUs no node has.
    code, _, err = labpipe_jobs(capsys, "submit", "grok_train", "--executor", "slurm", "--partition", "gpu")
    assert code == 2 and "partition 'gpu' is not one Slurm knows: debug" in err
    code, _, err = labpipe_jobs(capsys, "submit", "grok_train", "--executor", "slurm", "--gpus", "1")
    assert code == 2 and "no node of partition 'debug' has that many GPUs (the most is 0" in err
    shared = ("--set", "synth.out_dir=/shared/shards")  # where a job can read the shards
    code, _, err = labpipe_jobs(capsys, "submit", "lm_train", "--executor", "slurm", "--nodes", "2", *shared)
    assert code == 2 and "--nodes 2 with 1 task(s) and 0 GPU(s) each: partition 'debug' has 1 such node(s)" in err
    many = str((os.cpu_count() or 1) + 1)
    code, _, err = labpipe_jobs(capsys, "submit", "lm_train", "--executor", "slurm", "--tasks-per-node", many,
                                *shared)
    assert code == 2 and f"--nodes 1 with {many} task(s)" in err and "has 0 such node(s)" in err
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=cluster).stdout == ""

    code, out, _ = labpipe_jobs(capsys, "submit", "grok_train", "--executor", "slurm", "--hold", "--time", "5")
    assert code == 0 and "to Slurm job" in out
    record = newest_job(project)
    assert slurm_cluster.squeue(cluster, record.slurm_job_id) == [[record.slurm_job_id, "PENDING", "JobHeldUser",
                                                                   "5:00"]]
    code, out, _ = labpipe_jobs(capsys, "list")
    assert f"slurm {record.slurm_job_id}" in out and "PENDING" in out

    code, out, _ = labpipe_jobs(capsys, "modify", record.id, "--time", "7")
    assert code == 0 and "TimeLimit=7" in out
    assert slurm_cluster.squeue(cluster, record.slurm_job_id)[0][3] == "7:00"  # Slurm's own view
    assert registry.find(project, record.id).resources["time"] == "7"
    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--partition", "gpu")
    assert code == 2 and "partition 'gpu' is not one Slurm knows" in err
    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--set", "grok.lr=0.1")
    assert code == 2 and "cancel the job and submit it again" in err

    code, out, _ = labpipe_jobs(capsys, "cancel", record.id)
    assert code == 0 and "cancelled 1 task(s)" in out
    slurm_cluster.wait_for(lambda: slurm_cluster.squeue(cluster, record.slurm_job_id)[0][1] == "CANCELLED",
                           timeout=20, what="the job to be cancelled")
    code, _, err = labpipe_jobs(capsys, "modify", record.id, "--time", "9")
    assert code == 2 and "is CANCELLED: Slurm changes the time limit and partition of pending jobs only" in err

    # The cluster's GPUs per node: none on this one.
    capsys.readouterr()
    assert accelerators.main(["--cluster"]) == 0
    out = capsys.readouterr().out
    assert "1 node(s), 0 GPU(s)" in out and "debug" in out and out.rstrip().endswith("none")
    assert accelerators.main(["--cluster", "--nodes", "2"]) == 1  # what a 2-node job would get here: one node
    assert "a job of 2 node(s) x 0 GPU(s), 1 task(s) each (2 ranks) in partition debug: 1 node(s) fit" in \
        capsys.readouterr().out


@pytest.mark.slurm
def test_slurm_job_requeued_after_preemption_resumes_and_finishes(in_slurm_project, cluster, capsys):
    """Preempted twice: `scontrol requeue` (killed, no warning), then USR2 (what Slurm sends before a
    preemption or the time limit: submitit calls checkpoint() and requeues). Each time the job runs again,
    the stage resumes from its own checkpoint in the same MLflow run, and the job finishes."""
    project = in_slurm_project
    epochs = 200
    code, _, _ = labpipe_jobs(capsys, "submit", "grok_train", "--executor", "slurm", "--time", "20",
                              "--set", f"grok.epochs={epochs}", "--set", "grok.checkpoint_every=10",
                              "--set", "grok.seed=1")
    assert code == 0
    record = newest_job(project)
    checkpoints = Path(record.tasks[0].workdir) / "artifacts/grok/checkpoints"
    log = jobs._submitit_job(record, record.tasks[0]).paths.stdout

    def newest_checkpoint() -> int:
        return max((int(path.stem.split("_")[1]) for path in checkpoints.glob("epoch_*.pt")), default=0)

    def running(start: int, checkpoint_beyond: int) -> bool:
        """The job runs for the start-th time (0: the first), past a checkpoint of that run."""
        text = log.read_text() if log.exists() else ""
        return (text.count("dvc repro grok_train") == start + 1 and text.count("resuming from") == start
                and slurm_cluster.squeue(cluster, record.slurm_job_id)[0][1] == "RUNNING"
                and newest_checkpoint() > checkpoint_beyond)

    slurm_cluster.wait_for(lambda: running(0, 0), timeout=90, what="a first checkpoint")
    subprocess.run(["scontrol", "requeue", record.slurm_job_id], env=cluster, check=True)
    first = newest_checkpoint()
    slurm_cluster.wait_for(lambda: running(1, first), timeout=120, interval=0.5,
                           what="the requeued job's next checkpoint")
    subprocess.run(["scancel", "--signal=USR2", record.slurm_job_id], env=cluster, check=True)

    assert wait_until_done(record, timeout=240) == ["COMPLETED"]
    text = log.read_text()
    assert "(restart 1)" in text and "(restart 2)" in text
    assert "checkpoint: requeued" in text  # StageJob.checkpoint, called by submitit on USR2
    assert text.count("resuming from artifacts/grok/checkpoints/epoch_") == 2
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id],
                               f"tags.`labpipe.job_id` = '{record.id}'")
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == set(range(1, epochs + 1))  # one run, every epoch, across three starts


@pytest.mark.slurm
def test_slurm_sweep_array_runs_the_submitted_code_and_lands_in_one_experiment(in_slurm_project, cluster, capsys):
    project = in_slurm_project
    commit_before = git(project, "rev-parse", "HEAD")
    code, out, _ = labpipe_jobs(capsys, "submit", "grok-train", "--executor", "slurm",
                                "--sweep", "grok.weight_decay=0.01,0.03,0.1")
    assert code == 0 and "3 task(s)" in out
    record = newest_job(project)
    # Edits after submission are not what runs: the tasks run the snapshot of the submitted commit.
    grok_init = project / "src/labpipe/grok/__init__.py"
    original = grok_init.read_text()
    grok_init.write_text(original + "print('edited after submission', flush=True)\n")
    try:
        assert wait_until_done(record, timeout=240) == ["COMPLETED"] * 3
    finally:
        grok_init.write_text(original)

    rows = slurm_cluster.squeue(cluster, record.slurm_job_id)  # Slurm's view: one array of three tasks
    assert sorted((row[0], row[1]) for row in rows) == [(f"{record.slurm_job_id}_{i}", "COMPLETED") for i in range(3)]
    assert record.code["commit"] == commit_before and not record.code["dirty"]
    for task in record.tasks:
        paths = jobs._submitit_job(record, task).paths
        assert paths.stdout.parent == record.folder / "logs"  # logs gathered in the job folder
        text = paths.stdout.read_text()
        assert MARKER in text and "edited after submission" not in text
        assert "data: every input of grok_train matches the submitted dvc.lock" in text
        assert yaml.safe_load((Path(task.workdir) / "params.yaml").read_text()) == task.params

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mheight-grokking")
    runs = client.search_runs([experiment.experiment_id], f"tags.`labpipe.job_id` = '{record.id}'")
    assert sorted(float(r.data.params["grok.weight_decay"]) for r in runs) == [0.01, 0.03, 0.1]
    assert sorted(r.data.tags["labpipe.task"] for r in runs) == ["0", "1", "2"]
    assert {r.data.tags["mlflow.source.git.commit"] for r in runs} == {commit_before}
    assert {r.info.status for r in runs} == {"FINISHED"}

    code, out, _ = labpipe_jobs(capsys, "show", record.id, "--lines", "2")
    assert code == 0 and out.count("mlflow run ") == 3 and out.count(": COMPLETED") == 3


@pytest.fixture(scope="module")
def lm_slurm_project(tmp_path_factory, cluster):
    """A tiny project whose synthetic shards are made (`dvc repro synth`, lock committed): what lm_train reads."""
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text().replace(": off", ': "off"')))
    root = tmp_path_factory.mktemp("lm-slurm-project")
    params["synth"]["out_dir"] = str(root / "scratch/shards")  # storage the nodes share: a job's snapshot reads it
    project = make_project(root / "project", params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    done = subprocess.run(["dvc", "repro", "synth"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    commit(project, "synthetic shards")
    return project


@pytest.mark.slurm
def test_a_two_task_slurm_job_trains_lm_as_two_ranks_one_run_one_set_of_checkpoints(lm_slurm_project, cluster,
                                                                                    capsys, monkeypatch):
    project = lm_slurm_project
    monkeypatch.chdir(project)
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    code, out, _ = labpipe_jobs(capsys, "submit", "lm_train", "--executor", "slurm", "--tasks-per-node", "2",
                                *("--set", "lm.max_steps=8", "--set", "lm.decay_steps=8"),
                                *("--set", "lm.checkpoint_every=4"))
    assert code == 0 and "each 2 ranks (1 node(s) x 2)" in out, out
    record = newest_job(project)
    assert wait_until_done(record, timeout=300) == ["COMPLETED"]

    logs = {rank: next((record.folder / "logs").glob(f"{record.slurm_job_id}_{rank}_log.out")).read_text()
            for rank in (0, 1)}
    assert "task 0 rank 0 of 2: dvc repro lm_train" in logs[0] and "task 0 rank 1 of 2" in logs[1]
    workdir = Path(record.tasks[0].workdir)
    checkpoints = sorted(p.name for p in (workdir / "artifacts/lm/checkpoints").iterdir() if p.name != "run.json")
    assert checkpoints == ["step_00000004", "step_00000008"]  # written once, by rank 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(lines.line_of("lm_train").experiment)
    [run] = client.search_runs([experiment.experiment_id], f"tags.`labpipe.job_id` = '{record.id}' and "
                                                           "tags.`labpipe.stage` = 'lm_train'")
    assert run.info.status == "FINISHED" and run.data.tags["ranks"] == "2"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == {8}
