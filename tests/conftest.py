"""Shared fixtures and helpers: a private MLflow store per test, a real MLflow server, the repo's params as a
mutable dict (and shrunk to a tiny size), labpipe run in this process."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py: the independent oracles


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real SQLite-backed MLflow store in tmp_path, used through MLFLOW_TRACKING_URI like the Makefile does."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` (SQLite backend, served artifacts), as the compose stack runs it."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()) from None
            time.sleep(0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri, tmp_path / "server-artifacts"
    server.terminate()
    server.wait(timeout=30)
    log.close()


def load_repo_params() -> dict:
    """The repo's params.yaml as a dict, to shrink and write into a test project."""
    return yaml.safe_load((REPO / "params.yaml").read_text().replace(": off", ': "off"'))


@pytest.fixture
def repo_params() -> dict:
    return load_repo_params()


def tiny_params(params: dict) -> dict:
    """`params` (the repo's) shrunk so that every stage of the pipeline runs in seconds on a laptop CPU."""
    params["mheight"].update({"n": [9], "k": [4, 5], "samples_per_group": 12, "train_per_group": 4,
                              "val_per_group": 4, "test_per_group": 4, "workers": 1})
    params["grok"].update({"width": 16, "blocks": 1, "batch_size": 16, "epochs": 6, "val_every": 3,
                           "checkpoint_every": 3, "device": "cpu"})
    params["text"].update({"stories": 60, "vocab_sizes": [60, 100]})
    params["hmm"].update({"vocab_size": 60, "hidden_states": 4, "epochs": 2, "checkpoint_every": 1, "device": "cpu"})
    params["synth"].update({"seq_length": 16, "sequences_per_shard": 64, "train_shards": 2, "val_shards": 1,
                            "block_sequences": 32})
    params["lm"].update({"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32, "context_length": 16,
                         "batch_size": 8, "warmup_steps": 2, "max_steps": 4, "eval_every": 2, "eval_sequences": 16,
                         "checkpoint_every": 2, "device": "cpu"})
    params["dormancy"].update({"samples": 16, "device": "cpu"})
    params["crosscoder"].update({"source_a": "artifacts/lm/checkpoints/step_00000002",
                                 "source_b": "artifacts/lm/checkpoints/step_00000004", "layer_a": 0, "layer_b": 0,
                                 "buffer_tokens": 512, "dict_size": 32, "steps": 6, "batch_size": 64, "log_every": 3,
                                 "checkpoint_every": 3, "device": "cpu", "l1_warmup_steps": 2, "lr_warmup_steps": 2})
    return params


def run_labpipe(directory: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`labpipe ARGV` in `directory`, in this process (a stage costs its imports once): what `python -m labpipe`
    would print and return, a bug's traceback going to stderr with exit code 1."""
    from labpipe import cli

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(directory)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def make_queued(target: str, *assignments: str) -> list[set[str]]:
    """The -S overrides of each `dvc exp run --queue` that `make TARGET ASSIGNMENTS` would run, one set per
    queued experiment, read from the recipe's dry run (make -n) and its loop run with echo for dvc."""
    dry = subprocess.run(["make", "-n", target, *assignments], cwd=REPO, capture_output=True, text=True, check=True)
    loop = next(line for line in dry.stdout.replace("\\\n", " ").splitlines() if "dvc exp run --queue" in line)
    echoed = subprocess.run(["bash", "-c", loop.replace("dvc exp run --queue", "echo")], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [set(re.findall(r"-S (\S+)", line)) for line in echoed]


def write_params(directory: Path, params: dict) -> Path:
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def copy_project(destination: Path) -> None:
    """The files git would put in a fresh clone (tracked, or new and not ignored), without stage outputs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and not name.startswith("artifacts/"):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_store, repo_params):
    """A scratch project directory (cwd) with the repo's params.yaml; returns (path, params dict)."""
    directory = tmp_path / "project"
    directory.mkdir()
    shutil.copy(REPO / "params.yaml", directory / "params.yaml")
    monkeypatch.chdir(directory)
    return directory, repo_params


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present (a lent GPU machine, a GPU CI runner)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def stop_by_pid_file(pid_file: Path, timeout: float) -> None:
    """SIGTERM the daemon whose pid `pid_file` holds, SIGKILL it after `timeout` s; nothing if it is gone
    (the slurm and docker harnesses)."""
    if not pid_file.exists():
        return
    with contextlib.suppress(ProcessLookupError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # ProcessLookupError once it has exited
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
