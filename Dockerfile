# syntax=docker/dockerfile:1
# labpipe's images. `docker compose build` makes both; by hand:
#   docker build -t labpipe .                                     the trainer (the default, last stage)
#   docker build --target mlflow-server -t labpipe-mlflow .       the compose stack's tracking server
# The trainer: CUDA base, torch's CUDA build, labpipe with the dependency versions of docker/constraints.txt,
# a non-root user, entrypoint `labpipe` (`docker run --gpus all labpipe` prints `labpipe doctor`).

# ----------------------------------------------------------------------------- the tracking server
FROM python:3.12.12-slim-bookworm AS mlflow-server
COPY docker/constraints.txt docker/server-requirements.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/server-requirements.txt -c /tmp/constraints.txt \
    && useradd --create-home --uid 1000 mlflow \
    && install -d -o mlflow -g mlflow /mlartifacts
USER 1000:1000
# Standalone (no MLFLOW_BACKEND_STORE_URI), the server keeps its SQLite store here.
WORKDIR /home/mlflow
EXPOSE 5000
# /health is exempt from MLflow's Host-header check, so this probe works whatever --allowed-hosts says.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--serve-artifacts", "--artifacts-destination", "/mlartifacts"]

# ----------------------------------------------------------------------------- CUDA + Python, shared below
# torch's CUDA wheels bring their own CUDA runtime, cuBLAS and cuDNN (pip packages), so the CUDA image is here
# for its driver set-up (NVIDIA_* variables, forward-compat libraries): the small `base` flavour, no second copy
# of the libraries. Its CUDA (13.0) matches the torch build below (TORCH_INDEX): change the two together.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS cuda-python
# The tag pins Ubuntu 24.04; packages follow its security updates rather than versions that leave the archive.
# git: DVC needs it, and MLflow runs record the commit.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ----------------------------------------------------------------------------- the virtual environment
FROM cuda-python AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.13.0+cu130
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a code change rebuilds the last small layer, not torch & co.
# One resolve under the constraints: torch's CUDA build from the PyTorch index, everything else from PyPI.
COPY docker/constraints.txt docker/
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --extra-index-url "$TORCH_INDEX" -c docker/constraints.txt "torch==$TORCH_VERSION" \
        -r /tmp/requirements.txt
COPY README.md ./
COPY src/ src/
RUN pip install --no-deps . \
    && python -c "import torch; assert torch.version.cuda, 'torch is a CPU build'; print(torch.__version__)"

# ----------------------------------------------------------------------------- the trainer (default)
FROM cuda-python AS trainer
# The image user's ids; build with the host user's (--build-arg UID=$(id -u)) so that a mounted project's
# files stay theirs. Ubuntu's images ship a user `ubuntu` with uid 1000: it makes way.
ARG UID=1000
ARG GID=1000
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid "$GID" labpipe \
    && useradd --create-home --uid "$UID" --gid "$GID" labpipe \
    && install -d -o labpipe -g labpipe /workspace /home/labpipe/.cache \
    && git config --system --add safe.directory /workspace
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/train.sh /usr/local/bin/labpipe-train
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true
USER ${UID}:${GID}
WORKDIR /workspace
# No HEALTHCHECK: the trainer is a batch job, healthy while it runs; `labpipe doctor` is its pre-flight check.
ENTRYPOINT ["labpipe"]
CMD ["doctor"]
