# labpipe's images; any builder (BuildKit or the classic one) builds them, with no frontend to pull.
#   docker build -t labpipe .                                             the GPU trainer (the default stage)
#   docker build --build-arg FLAVOR=cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t labpipe-cpu .     the CPU trainer
#   docker build --target mlflow-server -t labpipe-mlflow .               the compose stack's tracking server
# `docker compose --profile gpu --profile cpu build` builds all three as docker-compose.yml names them.
# Every Python package comes at the version docker/constraints.txt pins (check_build.py fails the build
# otherwise). A mirror or proxy: pass PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST,
# PIP_CERT as build args.

# The trainer's base: cuda (the CUDA image, torch's CUDA build from PyPI) or cpu (the Python image, torch's CPU
# build from TORCH_INDEX).
ARG FLAVOR=cuda

# ----------------------------------------------------------------------------- the tracking server
FROM python:3.12.12-slim-bookworm AS mlflow-server
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/constraints.txt docker/server-requirements.txt /tmp/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c /tmp/constraints.txt -r /tmp/server-requirements.txt setuptools
COPY docker/check_build.py /tmp/
COPY docker/mlflow-server.sh /usr/local/bin/mlflow-server
RUN /opt/venv/bin/python /tmp/check_build.py /tmp/constraints.txt \
    && chmod 0755 /usr/local/bin/mlflow-server \
    && useradd --create-home --uid 1000 mlflow \
    && install -d -o mlflow -g mlflow /mlartifacts
ENV PATH=/opt/venv/bin:$PATH
USER 1000:1000
# Standalone (no POSTGRES_HOST), the server keeps its SQLite store here.
WORKDIR /home/mlflow
EXPOSE 5000
# /health is exempt from MLflow's Host-header check, so this probe works whatever --allowed-hosts says.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow-server"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--serve-artifacts", "--artifacts-destination", "/mlartifacts"]

# ----------------------------------------------------------------------------- the trainer's two bases
# torch's CUDA wheels bring their own CUDA runtime, cuBLAS and cuDNN (pip packages), so the CUDA image is here
# for its driver set-up (NVIDIA_* variables, NVIDIA_REQUIRE_CUDA): the small `base` flavour. Its CUDA (13.0) is
# the one of PyPI's torch build that constraints.txt pins: check_build.py fails the build when they part.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS cuda-python
# The tag pins Ubuntu 24.04; packages follow its security updates rather than versions that leave the archive.
# git: DVC needs it, and MLflow runs record the commit.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.12.12-slim-bookworm AS cpu-python
# Packages follow Debian 12's security updates, as above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

# ----------------------------------------------------------------------------- the virtual environment
# A stage of this file, named by FLAVOR: the lint cannot see that it is pinned.
# hadolint ignore=DL3006
FROM ${FLAVOR}-python AS builder
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_CERT
# Where torch comes from besides PyPI: empty for the CUDA build (PyPI's), the PyTorch CPU index for FLAVOR=cpu
# (its 2.13.0+cpu satisfies the lock's torch==2.13.0 and sorts above PyPI's build).
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies alone, from pyproject.toml: labpipe itself goes in the trainer's last layers, so a code
# change rebuilds those and not torch & co.
COPY docker/constraints.txt docker/
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -c docker/constraints.txt \
        -r /tmp/requirements.txt setuptools
COPY docker/check_build.py docker/
RUN python docker/check_build.py docker/constraints.txt

# ----------------------------------------------------------------------------- the trainer (default)
# As the builder's base.
# hadolint ignore=DL3006
FROM ${FLAVOR}-python AS trainer
# No ids are built in: the entrypoint runs each command as the owner of the mounted project (entrypoint.sh),
# so the container starts as root. `labpipe` (uid 1000) owns /workspace and the home when nothing is mounted.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group labpipe \
    && install -d -o labpipe -g labpipe /workspace /home/labpipe/.cache \
    && git config --system --add safe.directory /workspace
COPY --from=builder /opt/venv /opt/venv
# What changes most goes last: the scripts and labpipe itself are small layers above the venv's gigabytes.
COPY docker/entrypoint.sh /usr/local/bin/labpipe-entrypoint
COPY docker/train.sh /usr/local/bin/labpipe-train
COPY pyproject.toml README.md /opt/labpipe/
COPY src/ /opt/labpipe/src/
RUN chmod 0755 /usr/local/bin/labpipe-entrypoint /usr/local/bin/labpipe-train \
    && PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip install --no-deps --no-build-isolation --disable-pip-version-check \
        /opt/labpipe
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/labpipe \
    USER=labpipe \
    LOGNAME=labpipe \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /workspace
# No HEALTHCHECK: the trainer is a batch job, healthy while it runs; `labpipe doctor` is its pre-flight check.
ENTRYPOINT ["labpipe-entrypoint", "labpipe"]
CMD ["doctor"]
