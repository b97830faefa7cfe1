"""Training checkpoints: atomic, epoch (or step) in the file name, newest found by `latest`.

A job that is killed at any moment restarts from `latest(dir)`: a checkpoint is either complete
or absent, because it is written to a temp file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from labpipe.config import flatten
from labpipe.files import atomic_path, sha256_file

_NAME = re.compile(r"^(?P<unit>epoch|step)_(?P<number>\d+)\.pt$")


def checkpoint_path(directory: str | Path, number: int, unit: str = "epoch") -> Path:
    return Path(directory) / f"{unit}_{number:08d}.pt"


def save(directory: str | Path, number: int, state: dict[str, Any], keep: int = 0, unit: str = "epoch") -> Path:
    """Write `state` as `<unit>_<number>.pt`; keep only the newest `keep` checkpoints (0 keeps all)."""
    path = checkpoint_path(directory, number, unit)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temp files of a killed write are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m["number"]), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: str | Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load(path: str | Path) -> dict[str, Any]:
    # weights_only=False: our checkpoints hold RNG states and plain Python records, and are our own files.
    return torch.load(path, map_location="cpu", weights_only=False)


def fingerprint(params: Any, inputs: Iterable[str | Path], package: str | Path) -> str:
    """What a checkpoint must match to be resumed: the stage's params, the exact input files and the code of
    its package (what its DVC stage depends on, so a checkpoint is resumed exactly when DVC would rerun it)."""
    digest = hashlib.sha256(json.dumps(flatten(params), sort_keys=True).encode())
    for path in (*inputs, *sorted(Path(package).glob("*.py"))):
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def resume(directory: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint in `directory` if it was made with `fingerprint` (the params, data and code of
    the job), else None; checkpoints of another fingerprint are deleted, so that they are never mixed in."""
    newest = latest(directory)
    if newest is None:
        return None
    saved = load(newest)
    if saved.get("fingerprint") == fingerprint:
        print(f"resuming from {newest}")  # its name says the epoch or step
        return saved
    print(f"checkpoints in {directory} were made with other params, data or code: starting afresh")
    shutil.rmtree(directory)
    return None
