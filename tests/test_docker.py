"""labpipe's images built and its compose stack run for real (`make test-docker`; tests/docker_engine.py).

The three images are built from the Dockerfile unchanged on stand-in bases, then: the build's own checks
(torch for the base, every package at its lock's version) are redone here from outside; `docker run labpipe`
is the doctor; postgres + mlflow + trainer-cpu come up from docker-compose.yml (a test override puts them
on host networking, service names on 127.0.0.1) with a password full of URI characters; fresh clones owned
by root and by a cluster user run the m-height line in the trainer; what they wrote is theirs, and the
runs, metrics, champion and an artifact are checked through the server's REST API and in PostgreSQL.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import docker_engine
from conftest import REPO, copy_project, load_repo_params, tiny_params, write_params
from docker_engine import docker

pytestmark = pytest.mark.docker

TAG = "test"
IMAGES = {"mlflow": f"labpipe-mlflow:{TAG}", "gpu": f"labpipe:{TAG}", "cpu": f"labpipe-cpu:{TAG}"}
PASSWORD = "p@ss:w/rd%20?#"  # every character that needs escaping in a URI
CLUSTER_USER = (1234, 100)  # a uid no image knows, in Debian's `users` group
EXPERIMENT, CHAMPION = "mheight-grokking", "mheight-regressor"


@pytest.fixture(scope="module")
def engine():
    if (reason := docker_engine.missing()) is not None:
        pytest.skip(reason)
    with docker_engine.engine() as env:
        yield env


@pytest.fixture(scope="module")
def images(engine, tmp_path_factory):
    """The stand-ins, then the three images as docker-compose.yml tags them (LABPIPE_TAG=test)."""
    started = time.monotonic()
    docker_engine.build_standins(engine)
    timings = {"stand-ins": time.monotonic() - started}
    pip = [f"--build-arg={k}={v}" for k, v in docker_engine.pip_build_args().items()]
    cpu_wheels = [w for w in docker_engine.local_wheels() if w.name.startswith("torch-") and "+cpu" in w.name]
    with docker_engine.loopback_index(cpu_wheels, tmp_path_factory.mktemp("index")) as index:
        builds = {"mlflow": ["--target=mlflow-server"], "gpu": [],
                  "cpu": ["--build-arg=FLAVOR=cpu", *([f"--build-arg=TORCH_INDEX={index}"] if cpu_wheels else [])]}
        for name, args in builds.items():
            started = time.monotonic()
            done = docker(engine, "build", "--network=host", "--progress=plain", *pip, *args,
                          f"--tag={IMAGES[name]}", str(REPO), check=False, capture_output=True)
            assert done.returncode == 0, done.stderr[-5000:]
            timings[name] = time.monotonic() - started
    sizes = {name: docker(engine, "image", "inspect", "--format={{.Size}}", image, capture_output=True).stdout
             for name, image in IMAGES.items()}
    print("build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "; sizes GB: "
          + ", ".join(f"{k} {int(v) / 1e9:.2f}" for k, v in sizes.items()), file=sys.stderr)


def run_image(engine, image: str, *args: str, entrypoint: str | None = None, **kwargs):
    flags = [f"--entrypoint={entrypoint}"] if entrypoint else []
    return docker(engine, "run", "--rm", "--network=host", *flags, image, *args, check=False, capture_output=True,
                  **kwargs)


def lock_pins() -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9][\w.-]*)==([^\s;]+)", line):
            pins.setdefault(re.sub(r"[-_.]+", "-", match[1]).lower(), set()).add(match[2])
    return pins


# ----------------------------------------------------------------------------- the images


@pytest.mark.parametrize(("name", "cuda"), [("gpu", "13.0"), ("cpu", None)])
def test_each_trainer_has_the_torch_of_its_base_and_only_locked_versions(engine, images, name, cuda):
    assert re.search(r"FROM nvidia/cuda:13\.0\.\d+-", (REPO / "Dockerfile").read_text())  # the base's CUDA
    probe = run_image(engine, IMAGES[name], "-c", "import torch; print(torch.__version__, torch.version.cuda)",
                      entrypoint="python")
    assert probe.returncode == 0, probe.stderr
    version, built_for = probe.stdout.split()
    assert built_for == str(cuda) and version.split("+")[0] in lock_pins()["torch"]
    frozen = run_image(engine, IMAGES[name], "freeze", "--all", entrypoint="pip")
    pins = lock_pins()
    for line in frozen.stdout.splitlines():
        project, _, installed = line.partition("==")
        project = re.sub(r"[-_.]+", "-", project).lower()
        if project not in ("pip", "labpipe") and " @ " not in line:
            assert installed.split("+")[0] in pins.get(project, ()), f"{name}: {line} is not in the lock"


def test_the_image_runs_the_doctor_as_its_own_user_and_requires_cuda_when_asked(engine, images):
    report = run_image(engine, IMAGES["gpu"])
    assert report.returncode == 0, report.stdout + report.stderr
    assert re.search(r"^warn\s+torch\s+torch 2\.13\.0\+cu130: CUDA 13\.0, cuDNN \d+; no GPU", report.stdout,
                     re.MULTILINE) and report.stdout.endswith("ready\n"), report.stdout
    refused = run_image(engine, IMAGES["gpu"], "doctor", "--require-cuda")
    assert refused.returncode == 1 and re.search(r"^FAIL\s+cuda", refused.stdout, re.MULTILINE), refused.stdout
    user = run_image(engine, IMAGES["cpu"], "id", "-u", entrypoint="labpipe-entrypoint")
    assert user.stdout.split() == ["1000"]  # nothing mounted: the owner of the image's /workspace


# ----------------------------------------------------------------------------- the stack

OVERRIDE = """\
# test-only: every service on the host's network, the service names on 127.0.0.1, nothing beyond loopback
services:
  postgres:
    network_mode: host
    command: ["postgres", "-c", "listen_addresses=127.0.0.1"]
  mlflow:
    network_mode: host
    ports: !reset []
    extra_hosts: ["postgres:127.0.0.1"]
  trainer-cpu:
    network_mode: host
    extra_hosts: ["mlflow:127.0.0.1", "postgres:127.0.0.1"]
"""


def fresh_clone(directory: Path, owner: tuple[int, int]) -> Path:
    """What `git clone` of the working tree gives (no data/, no artifacts/), toy-sized, owned by `owner`."""
    directory.mkdir()
    copy_project(directory)
    write_params(directory, tiny_params(load_repo_params()))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=directory, check=True)
    subprocess.run([*git, "add", "-A"], cwd=directory, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=directory, check=True)
    shutil.chown(directory, *owner)
    for path in directory.rglob("*"):
        shutil.chown(path, *owner)
    return directory


@pytest.fixture(scope="module")
def stack(engine, images, tmp_path_factory):
    """postgres + mlflow up from the first clone's docker-compose.yml; yields compose(clone, *args)."""
    for port in (5000, 5432):
        if not docker_engine.port_free(port):
            pytest.fail(f"port {port} on 127.0.0.1 is in use: the stack's services listen there (host networking)")
    override = tmp_path_factory.mktemp("compose") / "override.yml"
    override.write_text(OVERRIDE)
    env = {**engine, "LABPIPE_TAG": TAG, "POSTGRES_PASSWORD": PASSWORD, "COMPOSE_PROJECT_NAME": "labpipe-test",
           "COMPOSE_PROFILES": "cpu"}
    compose_binary = str(Path(sys.executable).parent / "docker-compose")

    def compose(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([compose_binary, "--project-directory", str(project), "-f",
                               str(project / "docker-compose.yml"), "-f", str(override), *args],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    first = fresh_clone(tmp_path_factory.mktemp("root") / "labpipe", (0, 0))
    compose(first, "up", "--detach", "--wait", "--no-build", "postgres", "mlflow")
    try:
        yield compose, first, tmp_path_factory
    finally:
        compose(first, "down", "--volumes", check=False)


def rest(endpoint: str, body: dict | None = None, raw: bool = False, **query):
    """The tracking server's answer to GET `endpoint`?`query` (POST `body` as JSON when given): parsed JSON, or
    the bytes when `raw`."""
    url = f"http://127.0.0.1:5000/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        content = answer.read()
    return content if raw else json.loads(content)


def grok_runs() -> list[dict]:
    """The grok_train runs of the m-height experiment, through the server's REST API."""
    experiment = rest("api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = rest("api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    runs = runs["runs"]
    return [r for r in runs if {t["key"]: t["value"] for t in r["data"]["tags"]}.get("labpipe.stage") == "grok_train"]


def best_val_loss(run_id: str) -> float:
    """The lowest val_loss the run logged, from its metric history."""
    history = rest("api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="val_loss")["metrics"]
    return min(m["value"] for m in history)


def run_of(clone: Path) -> str:
    """The MLflow run the clone's checkpoints say they belong to."""
    import torch

    newest = sorted((clone / "artifacts/grok/checkpoints").glob("epoch_*.pt"))[-1]
    return torch.load(newest, weights_only=False)["state"]["run_id"]


@pytest.mark.parametrize("owner", [(0, 0), CLUSTER_USER], ids=["root", "cluster-user"])
def test_a_fresh_clone_runs_the_m_height_line_in_the_trainer_and_the_server_holds_it(stack, owner):
    compose, first, tmp = stack
    clone = first if owner == (0, 0) else fresh_clone(tmp.mktemp("user") / "labpipe", owner)
    run = compose(clone, "run", "--rm", "--no-deps", "trainer-cpu", "repro", "grok_train")
    assert "ready" in run.stdout  # the doctor, before DVC
    assert (clone / "artifacts/grok/model.pt").is_file() and (clone / "data").is_dir()  # data/: made by the trainer
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [clone, *clone.rglob("*")]}
    assert owners == {owner}  # what the trainer wrote is the clone owner's, like the rest
    cache = compose(clone, "run", "--rm", "--no-deps", "--entrypoint=labpipe-entrypoint", "trainer-cpu",
                    "stat", "-c", "%u:%g", "/home/labpipe/.cache").stdout.split()
    assert cache[-1] == f"{owner[0]}:{owner[1]}"  # the shared cache volume follows whoever runs

    outputs = json.loads((clone / "artifacts/grok/metrics.json").read_text())
    run_id = run_of(clone)
    mine = rest("api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert mine["info"]["status"] == "FINISHED" and run_id in {r["info"]["run_id"] for r in grok_runs()}
    assert best_val_loss(run_id) == pytest.approx(outputs["best_val_loss"], rel=1e-6)
    served = rest("get-artifact", raw=True, path="metrics.json", run_uuid=run_id)
    assert served == (clone / "artifacts/grok/metrics.json").read_bytes()
    champion = rest("api/2.0/mlflow/registered-models/alias", name=CHAMPION, alias="champion")["model_version"]
    lowest = min(best_val_loss(r["info"]["run_id"]) for r in grok_runs())  # the champion rule: lowest wins
    assert best_val_loss(champion["run_id"]) == lowest

    sql = compose(first, "exec", "-T", "postgres", "psql", "--username=mlflow", "--dbname=mlflow", "-At", "-c",
                  f"select status from runs where run_uuid = '{run_id}'; "
                  f"select min(value) from metrics where run_uuid = '{run_id}' and key = 'val_loss'; "
                  f"select run_id from model_versions where name = '{CHAMPION}' and version = "
                  f"'{champion['version']}'").stdout.split()
    assert sql[0] == "FINISHED" and float(sql[1]) == pytest.approx(outputs["best_val_loss"], rel=1e-6)
    assert sql[2] == champion["run_id"]
