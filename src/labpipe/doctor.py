"""labpipe doctor [--params FILE] [--stage STAGE] [--require-cuda] [--min-free-gb GB] [--json]

Is this machine (or container) ready to run the pipeline? Each check is ok, warn or FAIL:

  torch   version and build (CPU-only or CUDA), the CUDA and cuDNN it sees, its GPUs and their memory
  params  params.yaml valid against the schema
  cuda    the GPU that --require-cuda or a `device: cuda` param needs (of every section, or of --stage's)
  mlflow  the store of tracking_uri(): a writable SQLite directory, or a server answering GET /health
  dvc     a DVC repo? `dvc status` in a line, a remote configured? (warnings: stages run without them)
  disk    free space where inputs and outputs go: data/, artifacts/, synth.out_dir

A FAIL is a requirement of the stages not met, and the exit status is then 1 (2 for a usage error), so
`labpipe doctor --require-cuda && dvc repro` refuses to start a GPU run on a machine that would train on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from labpipe.config import ConfigError, load_params, parse_yaml
from labpipe.errors import InputError

# The index of the CUDA build that the Docker image installs: the hint given to whoever has a CPU-only torch.
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu130"
GIB = 1024**3
OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclasses.dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    summary: str  # one line for a person
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # the facts, for --json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe doctor", description="Is this machine ready to run the pipeline?")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stage", help="check the requirements of one dvc.yaml stage (or its labpipe verb) only")
    parser.add_argument("--require-cuda", action="store_true", help="a visible CUDA GPU is a requirement")
    parser.add_argument("--min-free-gb", type=float, default=1.0, help="least free disk per data/output dir")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an MLflow server")
    parser.add_argument("--json", action="store_true", help="the report as JSON, for machines")
    args = parser.parse_args(argv)

    raw, params_check = read_params(Path(args.params))
    try:
        sections = stage_sections(args.stage) if args.stage else None
    except ValueError as error:
        print(f"labpipe doctor: error: {error}", file=sys.stderr)
        return 2
    requests = (["--require-cuda"] if args.require_cuda else []) + cuda_params(raw, sections)
    checks = [
        check_torch(),
        params_check,
        check_cuda(requests),
        check_mlflow(args.timeout),
        check_dvc(Path.cwd()),
        check_disk(data_dirs(raw), args.min_free_gb),
    ]
    failed = [check.name for check in checks if check.status == FAIL]
    if args.json:
        report = {"ok": not failed, "failed": failed, "stage": args.stage,
                  "checks": {c.name: {"status": c.status.lower(), "summary": c.summary, **c.data} for c in checks}}
        print(json.dumps(report, indent=2))
    else:
        print(render(checks, failed))
    return 1 if failed else 0


def render(checks: list[Check], failed: list[str]) -> str:
    lines = [f"{check.status:<5} {check.name:<7} {check.summary}" for check in checks]
    verdict = f"{len(failed)} requirement(s) not met: {', '.join(failed)}" if failed else "ready"
    return "\n".join(lines + [verdict])


# ----------------------------------------------------------------------------- torch and CUDA


def check_torch() -> Check:
    import torch

    cuda = torch.version.cuda
    data: dict[str, Any] = {
        "version": torch.__version__,
        "build": "cuda" if cuda else "cpu",
        "cuda": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "mps": torch.backends.mps.is_available(),
        "driver_gpus": nvidia_smi_gpus(),
    }
    for index in range(torch.cuda.device_count() if data["cuda_available"] else 0):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        data["devices"].append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                "total_gib": round(total / GIB, 1), "free_gib": round(free / GIB, 1)})
    build = f"CUDA {cuda}, cuDNN {data['cudnn']}" if cuda else "CPU-only build"
    devices = "; ".join(f"cuda:{d['index']} {d['name']} ({d['free_gib']} of {d['total_gib']} GiB free)"
                        for d in data["devices"]) or ("no GPU, Apple MPS" if data["mps"] else "no GPU")
    summary = f"torch {torch.__version__}: {build}; {devices}"
    if cuda is None and data["driver_gpus"]:
        # The seed-004 trap: a GPU in the box, the CPU wheel installed, and `device: auto` quietly on the CPU.
        return Check("torch", WARN, f"{summary}; but the driver sees {', '.join(data['driver_gpus'])}: "
                     f"{cpu_build_hint(torch.__version__)}", data)
    if cuda and not data["cuda_available"]:
        return Check("torch", WARN, f"{summary}: CUDA build, but no GPU visible", data)
    return Check("torch", OK, summary, data)


def cpu_build_hint(version: str) -> str:
    return (f"torch {version} is a CPU-only build: install the CUDA build, "
            f"e.g. pip install torch --index-url {TORCH_CUDA_INDEX}")


def nvidia_smi_gpus() -> list[str]:
    """The GPUs the NVIDIA driver sees, whatever torch was built for ([] without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{name.strip()} (driver {driver.strip()})" for name, _, driver in
            (line.rpartition(",") for line in out.splitlines() if "," in line)]


def cuda_params(raw: dict, sections: set[str] | None) -> list[str]:
    """`section.device=cuda...` for every params section (of the stage, when given) that asks for CUDA."""
    return [f"{name}.device={values['device']}" for name, values in raw.items()
            if (sections is None or name in sections) and isinstance(values, dict)
            and str(values.get("device", "")).startswith("cuda")]


def check_cuda(requests: list[str]) -> Check:
    import torch

    from labpipe.device import DeviceError, resolve_device

    if not requests:
        return Check("cuda", OK, "not required (no --require-cuda, no device: cuda in the params)",
                     {"required_by": []})
    who = ", ".join(requests)
    data = {"required_by": requests}
    if torch.version.cuda is None:
        return Check("cuda", FAIL, f"required by {who}, but {cpu_build_hint(torch.__version__)}", data)
    devices = {"cuda" if request == "--require-cuda" else request.partition("=")[2] for request in requests}
    for device in sorted(devices):
        try:
            resolve_device(device)
        except DeviceError as error:
            return Check("cuda", FAIL, f"required by {who}: {error}", data)
    return Check("cuda", OK, f"{torch.cuda.device_count()} GPU(s) visible, as {who} requires", data)


# ----------------------------------------------------------------------------- params and stages


def read_params(path: Path) -> tuple[dict, Check]:
    """The raw params (to read even when invalid) and whether they pass the schema."""
    if not path.exists():
        return {}, Check("params", WARN, f"{path} not found: no stage requirements to check", {"path": str(path)})
    raw = parse_yaml(path.read_text()) or {}
    try:
        load_params(path)
    except ConfigError as error:
        return raw, Check("params", FAIL, str(error), {"path": str(path)})
    return raw, Check("params", OK, f"{path} valid", {"path": str(path)})


def stage_sections(stage: str) -> set[str]:
    """The params sections a stage reads (registry.py); `stage` is its dvc.yaml name or its labpipe verb."""
    from labpipe import registry

    try:
        return set(registry.stage(stage).reads)
    except KeyError as error:
        raise InputError(error.args[0]) from None


# ----------------------------------------------------------------------------- MLflow


def check_mlflow(timeout: float) -> Check:
    from labpipe.tracking import store_problem, tracking_uri

    uri = tracking_uri()
    data: dict[str, Any] = {"uri": uri, "client_version": importlib.metadata.version("mlflow")}
    problem = store_problem(uri, timeout)
    data["reachable"] = problem is None
    if problem is not None:
        return Check("mlflow", FAIL, problem, data)
    if uri.startswith("sqlite:///"):
        return Check("mlflow", OK, f"{uri} (writable)", data)
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/version", timeout=timeout) as response:
            data["server_version"] = response.read().decode().strip()
        return Check("mlflow", OK, f"{uri}: server {data['server_version']} healthy", data)
    data["reachable"] = None
    return Check("mlflow", WARN, f"{uri}: not checked (doctor knows sqlite:/// and http(s):// stores)", data)


# ----------------------------------------------------------------------------- DVC


def check_dvc(root: Path) -> Check:
    repo = next((d for d in (root, *root.parents) if (d / ".dvc").is_dir()), None)
    data: dict[str, Any] = {"repo": str(repo) if repo else None, "changed": None, "remotes": None,
                            "default_remote": None}
    if repo is None:
        return Check("dvc", WARN, "not a DVC repository: stages run one by one, `dvc repro` needs the project", data)
    local = Path(sys.executable).parent / "dvc"
    dvc = str(local) if local.exists() else shutil.which("dvc") or "dvc"
    try:
        status = subprocess.run([dvc, "status", "--json"], cwd=root, capture_output=True, text=True, timeout=120)
        # `dvc config --list` (every config level, one key=value a line) rather than `dvc remote list`'s table,
        # which wraps long URLs onto lines of their own.
        config = subprocess.run([dvc, "config", "--list"], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return Check("dvc", WARN, f"DVC repo at {repo}, but dvc did not run: {error}", data)
    if status.returncode == 0:
        with contextlib.suppress(ValueError):  # anything but the JSON asked for counts as a failed status
            data["changed"] = sorted(json.loads(status.stdout or "{}"))
    if config.returncode == 0:
        keys = dict(line.partition("=")[::2] for line in config.stdout.splitlines())
        data["remotes"] = [key.split(".")[1] for key in keys if key.startswith("remote.") and key.endswith(".url")]
        data["default_remote"] = keys.get("core.remote")
    if data["changed"] is None:
        lines = status.stderr.strip().splitlines() or ["no output"]
        problem = next((line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")), lines[-1])
        return Check("dvc", WARN, f"DVC repo at {repo}, but `dvc status` failed: {problem}", data)
    changed = f"{len(data['changed'])} changed ({', '.join(data['changed'])})" if data["changed"] else "up to date"
    if not data["remotes"]:
        return Check("dvc", WARN, f"{repo}: {changed}; no remote, so outputs live in this machine's cache "
                     "alone (dvc remote add -d NAME URL)", data)
    default = f" (default: {data['default_remote']})" if data["default_remote"] else ""
    return Check("dvc", OK, f"{repo}: {changed}; remotes: {', '.join(data['remotes'])}{default}", data)


# ----------------------------------------------------------------------------- disk


def data_dirs(raw: dict) -> list[str]:
    """Where inputs and outputs go: data/, artifacts/ and the synthetic shards (terabytes at full scale)."""
    dirs = ["data", "artifacts"]
    out_dir = (raw.get("synth") or {}).get("out_dir")
    if out_dir and out_dir not in dirs:
        dirs.append(str(out_dir))
    return dirs


def check_disk(dirs: list[str], min_free_gb: float) -> Check:
    entries = []
    for name in dirs:
        path = Path(name).resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())  # where it will be created
        usage = shutil.disk_usage(existing)
        entries.append({"path": name, "exists": path.exists(), "free_gb": round(usage.free / 1e9, 1),
                        "total_gb": round(usage.total / 1e9, 1), "short": usage.free < min_free_gb * 1e9})
    data = {"dirs": entries, "min_free_gb": min_free_gb}
    summary = ", ".join(f"{e['path']} {e['free_gb']:g} GB free" for e in entries)
    short = [e["path"] for e in entries if e["short"]]
    if short:
        return Check("disk", FAIL, f"{summary}: under {min_free_gb:g} GB in {', '.join(short)}", data)
    return Check("disk", OK, summary, data)
