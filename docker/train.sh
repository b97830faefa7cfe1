#!/bin/sh
# The compose trainers' command (labpipe-train in the image): check the environment, then run DVC.
#   labpipe-train                      dvc repro: the whole pipeline
#   labpipe-train repro grok_train     one stage, and what it depends on
#   labpipe-train exp run -S grok.weight_decay=0.03
# `labpipe doctor` fails fast, before hours of work, when a requirement is not met: the MLflow server, free
# disk, and a GPU for the GPU trainer (LABPIPE_DOCTOR_ARGS=--require-cuda: `device: auto` would otherwise
# train on the CPU without a word when the GPU reservation did not reach the container).
set -eu
say() { echo "labpipe-train: $*" >&2; exit 1; }
[ -f dvc.yaml ] || say "$(pwd) holds no dvc.yaml: mount a labpipe checkout at /workspace"
[ -w . ] || say "$(pwd) is not writable by uid $(id -u): run as its owner (the default entrypoint does)"
# data/ is DVC-tracked and git-ignored: a fresh clone lacks it (see data.dvc)
mkdir -p data
# shellcheck disable=SC2086  # the doctor's flags, split into words on purpose
labpipe doctor ${LABPIPE_DOCTOR_ARGS:-}
[ "$#" -gt 0 ] || set -- repro
exec dvc "$@"
