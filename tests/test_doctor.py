"""labpipe doctor: the report on this machine (a CPU build), requirements that fail it, and --json."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from labpipe import cli
from labpipe.doctor import TORCH_CUDA_INDEX, main

CPU_BUILD = torch.version.cuda is None
CHECKS = ["torch", "params", "cuda", "mlflow", "dvc", "disk"]


def doctor(capsys, *args: str) -> tuple[int, dict]:
    code = main(["--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_this_machine_is_ready_and_reports_its_torch_build(project, capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[-1] == "ready"
    assert f"torch {torch.__version__}: " + ("CPU-only build" if CPU_BUILD else f"CUDA {torch.version.cuda}") in text


def test_json_report_has_the_fields(project, capsys):
    code, report = doctor(capsys)
    assert code == 0 and report["ok"] is True and report["failed"] == [] and report["stage"] is None
    assert list(report["checks"]) == CHECKS
    assert all({"status", "summary"} <= set(check) for check in report["checks"].values())
    checks = report["checks"]
    assert checks["torch"]["version"] == torch.__version__
    assert checks["torch"]["build"] == ("cpu" if CPU_BUILD else "cuda")
    assert checks["torch"]["cuda"] == torch.version.cuda
    assert {"cudnn", "cuda_available", "devices", "mps", "driver_gpus"} <= set(checks["torch"])
    assert checks["mlflow"]["uri"].startswith("sqlite:///") and checks["mlflow"]["reachable"] is True
    assert checks["dvc"] | {"summary": ""} == {"status": "warn", "summary": "", "repo": None, "changed": None,
                                               "remotes": None, "default_remote": None}  # no DVC repo
    assert [d["path"] for d in checks["disk"]["dirs"]] == ["data", "artifacts", "artifacts/synth/shards"]
    assert all(d["free_gb"] > 0 for d in checks["disk"]["dirs"])


@pytest.mark.skipif(not CPU_BUILD, reason="torch here is a CUDA build")
def test_require_cuda_on_a_cpu_build_fails_and_says_which_build_to_install(project, capsys):
    assert main(["--require-cuda"]) == 1
    text = capsys.readouterr().out
    assert (f"FAIL  cuda    required by --require-cuda, but torch {torch.__version__} is a CPU-only build: "
            f"install the CUDA build, e.g. pip install torch --index-url {TORCH_CUDA_INDEX}") in text
    assert text.splitlines()[-1] == "1 requirement(s) not met: cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_cuda_param_is_a_requirement_of_its_own_stages(project, capsys):
    directory, params = project
    params["grok"]["device"] = "cuda"
    (directory / "cuda.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", directory / "dvc.yaml")

    code, report = doctor(capsys, "--params", "cuda.yaml")
    assert code == 1 and report["failed"] == ["cuda"]
    assert report["checks"]["cuda"]["required_by"] == ["grok.device=cuda"]
    code, report = doctor(capsys, "--params", "cuda.yaml", "--stage", "grok-train")  # the verb names the stage
    assert code == 1 and report["stage"] == "grok-train"
    code, report = doctor(capsys, "--params", "cuda.yaml", "--stage", "mheight_data")  # its params: mheight.*
    assert code == 0 and report["checks"]["cuda"]["required_by"] == []
    assert main(["--stage", "no_such_stage"]) == 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_an_unreachable_mlflow_server_fails_clearly(project, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, report = doctor(capsys, "--timeout", "1")
    assert code == 1 and report["failed"] == ["mlflow"]
    mlflow = report["checks"]["mlflow"]
    assert mlflow["uri"] == uri and mlflow["reachable"] is False
    assert mlflow["summary"].startswith(f"MLflow server {uri} is unreachable (")
    assert "docker compose up -d mlflow" in mlflow["summary"]


def test_an_sqlite_store_in_a_missing_directory_fails(project, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}")
    code, report = doctor(capsys)
    assert code == 1 and "does not exist" in report["checks"]["mlflow"]["summary"]


def test_invalid_params_and_too_little_disk_fail(project, capsys):
    directory, params = project
    params["grok"]["learning_rate"] = 0.1
    (directory / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code, report = doctor(capsys, "--params", "bad.yaml", "--min-free-gb", "1e9")
    assert code == 1 and report["failed"] == ["params", "disk"]
    assert "grok.learning_rate" in report["checks"]["params"]["summary"]
    assert all(d["short"] for d in report["checks"]["disk"]["dirs"])


@pytest.mark.skipif(not CPU_BUILD, reason="torch here is a CUDA build")
def test_a_gpu_behind_a_cpu_build_is_a_warning(project, capsys, monkeypatch, tmp_path):
    """The seed-004 trap: the driver sees a GPU, torch cannot use it, `device: auto` trains on the CPU."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 4090, 560.94'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    code, report = doctor(capsys)
    assert code == 0  # a warning: nothing asked for CUDA
    torch_check = report["checks"]["torch"]
    assert torch_check["status"] == "warn" and torch_check["driver_gpus"] == ["NVIDIA GeForce RTX 4090 (driver 560.94)"]
    assert f"is a CPU-only build: install the CUDA build, e.g. pip install torch --index-url {TORCH_CUDA_INDEX}" \
        in torch_check["summary"]


def test_dvc_status_and_remote(project, capsys):
    directory, _ = project
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=directory, check=True)
    code, report = doctor(capsys)
    assert code == 0  # warnings only
    assert report["checks"]["dvc"] | {"summary": ""} == {"status": "warn", "summary": "", "repo": str(directory),
                                                         "changed": [], "remotes": [], "default_remote": None}
    assert "no remote" in report["checks"]["dvc"]["summary"]
    subprocess.run([dvc, "remote", "add", "-d", "storage", str(directory.parent / "remote")], cwd=directory,
                   check=True)
    code, report = doctor(capsys)
    dvc_check = report["checks"]["dvc"]
    assert dvc_check["status"] == "ok" and dvc_check["remotes"] == ["storage"]
    assert dvc_check["default_remote"] == "storage"


def test_labpipe_doctor_verb(project, capsys):
    assert cli.main(["doctor"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ready"


def test_labpipe_doctor_verb_passes_flags(project, capsys):
    assert cli.main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
