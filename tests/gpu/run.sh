#!/usr/bin/env bash
# make test-gpu, on a machine with an NVIDIA GPU (the Makefile has checked `nvidia-smi -L`): the set-up
# (tests/gpu/setup.sh: a venv over the CUDA torch already there), the gpu-marked tests of every test file
# that has them (pytest -m gpu), then the GPU benches (bench/gpu.py), within GPU_BUDGET seconds in all
# (default 470: under 8 minutes): the tests are cut at GPU_TEST_TIMEOUT (default 180), the benches at what is
# left of the budget (bench/gpu.py writes its results after each bench, so a cut run keeps what it measured).
# Into $OUT (what the device tool brings back) or test-results/gpu/: setup.log, pytest.log, pytest.xml,
# results.json, results.md. The exit status is 1 when a step failed; the tests and the benches run whatever
# the other did, so one call gives every figure it can.
# GPU_PYTHON, WHEELS, GPU_SETUP_ALLOW_CPU: see setup.sh; GPU_VENV (default .venv-gpu); GPU_BENCH_ARGS: more
# flags for bench/gpu.py (e.g. --quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-test-results/gpu}
venv=${GPU_VENV:-.venv-gpu}
budget=${GPU_BUDGET:-470}
mkdir -p "$out"

if ! bash tests/gpu/setup.sh "$venv" 2>&1 | tee "$out/setup.log"; then
  echo "make test-gpu: the set-up failed (above, and in $out/setup.log)"
  exit 1
fi
python=$venv/bin/python
export PATH="$PWD/$venv/bin:$PATH" PYTHONUNBUFFERED=1
nvidia-smi -L || true

mapfile -t files < <(grep -l 'pytest\.mark\.gpu' tests/test_*.py)
timeout -k 10 "${GPU_TEST_TIMEOUT:-180}" "$python" -m pytest -m gpu -p no:cacheprovider \
  --junitxml="$out/pytest.xml" "${files[@]}" 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}

left=$((budget - SECONDS))
((left >= 60)) || left=60
echo "make test-gpu: the benches get ${left} s"
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of flags
timeout -k 10 "$left" "$python" bench/gpu.py --out "$out" ${GPU_BENCH_ARGS:-}
benches=$?

echo "make test-gpu: tests exit $tests, benches exit $benches, $SECONDS s in all; results in $out/"
[[ $tests == 0 && $benches == 0 ]]
