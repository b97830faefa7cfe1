# Stand-in for the CUDA base (nvidia/cuda:<version>-base-ubuntu24.04), which cannot be pulled here: a Debian
# rootfs with what the Dockerfile relies on in the real one: apt, the `ubuntu` user with uid 1000 and the
# NVIDIA_* / CUDA_VERSION environment. No CUDA libraries: the real base flavour has only the runtime, and torch
# brings its own.
FROM labpipe-standin/debian:bookworm
ARG CUDA_VERSION
COPY ca/ /usr/local/share/ca-certificates/
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && update-ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group ubuntu
ENV CUDA_VERSION=${CUDA_VERSION} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=${CUDA_VERSION}"
