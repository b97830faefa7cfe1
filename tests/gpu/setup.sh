#!/usr/bin/env bash
# tests/gpu/setup.sh [VENV]: make test-gpu's venv (default .venv-gpu) on a GPU machine, over the Python that
# already holds a CUDA build of torch (GPU_PYTHON, default python3): the image's torch is used as it is, never
# downloaded again. The venv sees that Python's packages (--system-site-packages, and, where that Python is a
# venv itself, its site-packages through a .pth: --system-site-packages alone would reach its base interpreter's
# instead), and gets tests/gpu/requirements.txt on top: from the wheels in WHEELS (default .whl/, made by
# `make gpu-wheels`) when it holds any (no index needed, no dependency resolution: the list is complete), else
# from the package index. Then labpipe itself, editable, without its dependencies (dvc, wandb, datasets and
# submitit stay out: no GPU test or bench needs them). A second run with nothing changed is instant.
# GPU_SETUP_ALLOW_CPU=1 accepts a CPU-only torch (to check this script on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-gpu}
base=${GPU_PYTHON:-python3}
wheels=${WHEELS:-.whl}
say() { echo "gpu setup: $*"; }

if ! torch_build=$("$base" -c 'import torch; print(f"{torch.__version__}, CUDA {torch.version.cuda}")' 2>/dev/null); then
  say "$base has no torch: point GPU_PYTHON at the Python that holds the CUDA build of torch" >&2
  exit 1
fi
if [[ $torch_build == *"CUDA None" && ${GPU_SETUP_ALLOW_CPU:-0} != 1 ]]; then
  say "$base's torch $torch_build is a CPU-only build: point GPU_PYTHON at the Python that holds the CUDA build" >&2
  exit 1
fi

shopt -s nullglob
carried=("$wheels"/*.whl)
shopt -u nullglob
stamp=$( { "$base" -c 'import sys; print(sys.executable)'; cat tests/gpu/requirements.txt pyproject.toml;
           printf '%s\n' "${carried[@]##*/}"; } | sha256sum | cut -d' ' -f1)
if [[ -f $venv/.installed && $(cat "$venv/.installed") == "$stamp" ]]; then
  say "$venv is up to date (torch $torch_build)"
  exit 0
fi

python=$venv/bin/python
make_venv() {  # make_venv [--without-pip]
  rm -rf "$venv"
  "$base" -m venv --system-site-packages "$@" "$venv"
  purelib=$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$base" - "$purelib" <<'EOF'
import pathlib, sys
dirs = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
line = "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs)
pathlib.Path(sys.argv[1], "_labpipe_gpu_base.pth").write_text(line + "\n")
EOF
}
# The base's own pip and setuptools (the setuptools that a venv bundles on Python 3.11 is too old to build
# labpipe); where the base has no pip, the venv's own.
make_venv --without-pip
"$python" -m pip --version >/dev/null 2>&1 || make_venv
pip=("$python" -m pip install -q --disable-pip-version-check --no-input)

if ((${#carried[@]})); then
  say "installing ${#carried[@]} wheels from $wheels/ (no index)"
  "${pip[@]}" --no-index --no-deps --no-compile "${carried[@]}"
else
  say "no wheels in $wheels/: installing tests/gpu/requirements.txt from the package index"
  "${pip[@]}" -r tests/gpu/requirements.txt
fi
if ! "${pip[@]}" --no-index --no-deps --no-build-isolation -e . 2>"$venv/labpipe-install.log"; then
  # No setuptools to build with: the source tree on the path and the console script by hand, the same labpipe.
  say "pip could not install labpipe editable ($(tail -1 "$venv/labpipe-install.log")): src/ on the path instead"
  echo "$PWD/src" >"$purelib/_labpipe_src.pth"
  printf '#!%s\nimport sys\nfrom labpipe.cli import main\nsys.exit(main())\n' "$(cd "$venv" && pwd)/bin/python" \
    >"$venv/bin/labpipe"
  chmod +x "$venv/bin/labpipe"
fi

"$python" - <<'EOF'
import importlib, sys
import torch
missing = []
for name in ("labpipe.cli", "mlflow", "pomegranate", "analog_ecc_heights", "transformers", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("gpu setup: does not import: " + "; ".join(missing))
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"gpu setup: {sys.prefix}: Python {sys.version.split()[0]}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}) from {torch.__file__.rsplit('/torch/', 1)[0]}, {gpu}")
EOF
echo "$stamp" >"$venv/.installed"
