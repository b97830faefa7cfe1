"""Shared fixtures: a private MLflow store per test, a real MLflow server, the repo's params as a mutable dict."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.fixture
def repo_params() -> dict:
    """The repo's params.yaml as a dict, to shrink and write into a test project."""
    return yaml.safe_load((REPO / "params.yaml").read_text().replace(": off", ': "off"'))


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
