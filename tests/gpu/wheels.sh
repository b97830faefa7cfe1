#!/usr/bin/env bash
# make gpu-wheels: the wheels of tests/gpu/requirements.txt, exactly those (one version each), into WHEELS
# (default .whl/, gitignored) for a GPU machine that reaches no package index: Linux x86-64, CPython PYVER
# (default 3.12, a lent GPU machine's). A package with no wheel on the index (apricot-select) is built here
# from its sdist, and must come out pure Python. Ends with the total size against the 64 MiB that a lent GPU
# machine takes with the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=${WHEELS:-.whl}
pyver=${PYVER:-3.12}
python=${PYTHON:-python3}
limit_mib=64

mkdir -p "$wheels"
rm -f "$wheels"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
while read -r requirement; do
  if ! "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$wheels" "$requirement" 2>/dev/null; then
    built=$(mktemp -d)
    "$python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$built" "$requirement"
    for wheel in "$built"/*.whl; do
      case $wheel in
        *-none-any.whl) mv "$wheel" "$wheels"/ ;;
        *) echo "gpu-wheels: $requirement has no wheel for Python $pyver and builds only as $(basename "$wheel")" >&2
           exit 1 ;;
      esac
    done
    rm -rf "$built"
  fi
done < <(grep -v '^\s*#' tests/gpu/requirements.txt | grep -v '^\s*$')

count=$(find "$wheels" -maxdepth 1 -type f -name '*.whl' | wc -l)
wheel_bytes=$(find "$wheels" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
# what travels with them: the files git would send (tracked or new and not ignored; a deleted one counts 0)
tree_bytes=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true; } \
  | awk '{s += $1} END {print s + 0}')
total=$((wheel_bytes + tree_bytes))
verdict="fits"
[ "$total" -le $((limit_mib * 1024 * 1024)) ] || verdict="does NOT fit"
awk -v n="$count" -v w="$wheel_bytes" -v t="$tree_bytes" -v d="$wheels" -v v="$verdict" -v l="$limit_mib" \
  'BEGIN {printf "gpu-wheels: %d wheels in %s, %.1f MiB; with the working tree (%.1f MiB) %.1f MiB: %s the %d MiB a lent GPU machine takes\n", n, d, w / 1048576, t / 1048576, (w + t) / 1048576, v, l}'
[ "$verdict" = fits ]
