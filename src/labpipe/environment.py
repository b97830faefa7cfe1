"""What a process runs under: its Python and every installed distribution, in a form two processes compare.

A job records it when submitted (labpipe.cluster.jobs), every MLflow run carries it as labpipe.env.* tags
(labpipe.tracking), and `labpipe jobs show` flags a task whose runs ran under another environment than the
one it was submitted from: another venv, image or node set-up.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from typing import Any

ENVIRONMENT_TAGS = ("python", "torch", "packages_sha256")  # what each run is tagged with (labpipe.env.*)


def environment() -> dict[str, Any]:
    """Python's version, torch's (its build: +cpu, +cu130) and the sorted `name==version` of every installed
    distribution but labpipe (its code is the commit), with their sha256."""
    names = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}
    packages = sorted(f"{name}=={version}" for name, version in names.items() if name not in ("", "labpipe"))
    return {"python": platform.python_version(), "torch": names.get("torch", ""),
            "packages_sha256": hashlib.sha256("\n".join(packages).encode()).hexdigest(), "packages": packages}
