"""Run at the end of each image build: the build fails unless the image is what the lock and the base say.

  python check_build.py LOCK
- every distribution in the running Python's environment (the image's venv) is pinned in LOCK
  (docker/constraints.txt) at the version installed: nothing came in unpinned, so two builds a year apart
  install the same versions;
- where torch is installed, it is the build for the base: CUDA `$CUDA_VERSION` (major.minor) on the CUDA
  base, a CPU build where that is unset (the Python base of trainer-cpu).
"""

import importlib.util
import os
import re
import sys
from importlib import metadata


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> int:
    problems, said = [], []
    if importlib.util.find_spec("torch"):
        import torch

        wanted = ".".join(os.environ.get("CUDA_VERSION", "").split(".")[:2]) or None
        if torch.version.cuda != wanted:
            problems.append(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; this base wants "
                            f"{wanted or 'a CPU build'}")
        said.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    pins = {}
    for line in open(lock, encoding="utf-8"):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            pins.setdefault(canonical(match[1]), set()).add(match[2])
    for dist in metadata.distributions():
        name, version = canonical(dist.metadata["Name"]), dist.version
        if name in ("labpipe", "pip"):  # the project itself; the venv's own installer
            continue
        if not {version, version.split("+")[0]} & pins.get(name, set()):  # ==2.13.0 admits 2.13.0+cpu
            problems.append(f"{name} {version} is not pinned in {lock}" if name not in pins else
                            f"{name} {version} installed, {lock} pins {', '.join(sorted(pins[name]))}")
    for problem in problems:
        print(f"check_build: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_build: {'; '.join([*said, f'every distribution pinned by {lock}'])}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
