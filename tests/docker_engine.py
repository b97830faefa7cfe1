"""A real Docker engine for the tests, the base images it cannot pull built as stand-ins, and a loopback index.

Debian's `docker.io` (`make test-docker` installs it and `debootstrap` when missing). dockerd runs as root with
its own data root, exec root, socket and pid file under ROOT, a fixed folder outside the checkout, so that
layers (torch & co.) are reused by the next run on this machine; it is stopped by its pid at the end. No
bridge and no iptables: containers use host networking, and the tests keep their traffic on loopback.

The Dockerfile's and the compose file's base images cannot be pulled here. Stand-ins are built under their
exact names, so the Dockerfile is used unchanged: a `debootstrap --variant=minbase` Debian rootfs from the
archive apt uses here, imported as an image, then tests/docker/*.Dockerfile on it (the CUDA base, the Python
base, PostgreSQL). They trust the host's extra CA certificates, and builds get the package index pip uses on
the host as build args (pip_build_args); the wheels pip finds on this disk are served on loopback as an index.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import stop_by_pid_file

ROOT = Path(os.environ.get("LABPIPE_TEST_DOCKER_ROOT", "/var/cache/labpipe-test-docker"))
# Debian's client: BuildKit without the buildx plugin (a newer client elsewhere on PATH would need buildx)
DOCKER = "/usr/bin/docker"
REPO = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "docker"
DEBIAN = "labpipe-standin/debian:bookworm"
HOST_CA = Path("/usr/local/share/ca-certificates")


def missing() -> str | None:
    """Why this machine cannot run the engine, or None."""
    absent = [name for name in ("dockerd", "debootstrap") if shutil.which(name) is None]
    if absent or not Path(DOCKER).exists():
        return f"needs Debian's docker.io and debootstrap ({', '.join(absent) or DOCKER} not found): " \
               "make test-docker installs them"
    if os.geteuid() != 0:
        return "dockerd runs as root"
    return None


def docker(env: dict[str, str], *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], env=env, check=check, text=True, **kwargs)


# ----------------------------------------------------------------------------- the daemon


@contextlib.contextmanager
def engine() -> Iterator[dict[str, str]]:
    """dockerd under ROOT; yields the environment its clients need (DOCKER_HOST)."""
    pid_file, socket_path = ROOT / "dockerd.pid", ROOT / "docker.sock"
    (ROOT / "exec").mkdir(parents=True, exist_ok=True)
    stop_by_pid_file(pid_file, 30)  # one left by a run that was killed
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}", "DOCKER_BUILDKIT": "1"}
    log = (ROOT / "dockerd.log").open("ab")
    subprocess.Popen(["dockerd", f"--data-root={ROOT / 'data'}", f"--exec-root={ROOT / 'exec'}",
                      f"--pidfile={pid_file}", f"--host=unix://{socket_path}", "--storage-driver=overlay2",
                      "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none"],
                     stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while docker(env, "info", check=False, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not come up in 60 s:\n{(ROOT / 'dockerd.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
        # what no tagged image uses any more (the layers of an earlier build): the cache would only grow
        docker(env, "system", "prune", "--force", check=False, capture_output=True)
    finally:
        stop_by_pid_file(pid_file, 30)
        log.close()


# ----------------------------------------------------------------------------- the stand-in bases


def base_images() -> dict[str, str]:
    """Stand-in Dockerfile -> the exact image name it stands in for, read from the Dockerfile and compose."""
    froms = re.findall(r"^FROM\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    compose = (REPO / "docker-compose.yml").read_text()
    names = {"cuda": [n for n in froms if n.startswith("nvidia/cuda:")],
             "python": [n for n in froms if n.startswith("python:")],
             "postgres": re.findall(r"image:\s*(postgres:\S+)", compose)}
    assert all(len(set(found)) == 1 for found in names.values()), names  # one name each: one stand-in each
    return {kind: found[0] for kind, found in names.items()}


def build_standins(env: dict[str, str]) -> dict[str, str]:
    """Build (or find in the layer cache) the stand-ins; returns what base_images() returns."""
    if docker(env, "image", "inspect", DEBIAN, check=False, capture_output=True).returncode != 0:
        rootfs = ROOT / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), _debian_mirror()],
                       check=True, capture_output=True)
        for cached in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            cached.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([DOCKER, "import", "-", DEBIAN], stdin=tar.stdout, env=env, check=True, capture_output=True)
        tar.wait()
        shutil.rmtree(rootfs)
    context = ROOT / "standin-context"
    shutil.rmtree(context, ignore_errors=True)
    shutil.copytree(STANDINS, context)
    (context / "ca").mkdir()
    for certificate in HOST_CA.rglob("*.crt") if HOST_CA.is_dir() else ():
        shutil.copy(certificate, context / "ca" / certificate.name)
    images = base_images()
    cuda_version = re.match(r"nvidia/cuda:([\d.]+)-", images["cuda"])[1]
    for kind, name in images.items():
        docker(env, "build", "--quiet", "--network=host", f"--file={context / f'{kind}.Dockerfile'}",
               f"--build-arg=CUDA_VERSION={cuda_version}", f"--tag={name}", str(context), capture_output=True)
    return images


def _debian_mirror() -> str:
    """The Debian archive this machine's apt uses."""
    sources = " ".join(p.read_text() for p in Path("/etc/apt").rglob("*") if p.suffix in (".list", ".sources"))
    found = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b(?!-)", sources)
    return found[1] if found else "http://deb.debian.org/debian"


# ----------------------------------------------------------------------------- the package index


@functools.cache
def _pip_settings() -> dict[str, str]:
    """pip's settings on this host: `pip config list`, then its PIP_* environment on top (key: index-url...)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            settings[name[4:].lower().replace("_", "-")] = value
    return settings


def pip_build_args() -> dict[str, str]:
    """The settings pip uses on this host that a build can use: index URLs (not file: ones, which a build
    cannot see), the timeout, and the CA bundle (the stand-ins' system one, which holds the host's CAs)."""
    settings = _pip_settings()
    args = {}
    for key in ("index-url", "extra-index-url", "trusted-host", "default-timeout"):
        urls = [v for v in settings.get(key, "").split() if not v.startswith("file:")]
        if urls:
            args[f"PIP_{key.upper().replace('-', '_')}"] = " ".join(urls)
    if "cert" in settings:
        args["PIP_CERT"] = "/etc/ssl/certs/ca-certificates.crt"
    return args


def local_wheels() -> list[Path]:
    """The wheels in the directories pip's find-links names on this host."""
    folders = _pip_settings().get("find-links", "").split()
    return sorted({w for folder in folders if Path(folder).is_dir() for w in Path(folder).glob("*.whl")})


@contextlib.contextmanager
def loopback_index(wheels: list[Path], directory: Path, port: int = 47831) -> Iterator[str]:
    """A PEP 503 index of `wheels` served on 127.0.0.1; yields its URL. A fixed port: the URL is a build arg,
    and a new one would rebuild the layers after it."""
    for wheel in wheels:
        project = directory / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        project.mkdir(parents=True, exist_ok=True)
        (project / wheel.name).symlink_to(wheel)
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
