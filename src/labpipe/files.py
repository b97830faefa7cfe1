"""Outputs written whole or not at all: a temp file in the same directory, then os.replace."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; it replaces `path` only if the block succeeds.

    Readers (and a job restarted after a kill) see the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _naming(path):
            yield tmp
            with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A write that fails without saying where (a full disk: ENOSPC from write()) names the output it was for."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error


def require_free(directory: str | Path, needed: int, knob: str) -> None:
    """Refuse, before writing anything, an output of `needed` bytes that `directory` has no room for."""
    from labpipe.errors import InputError

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise InputError(f"{directory}: the output needs {needed:,} bytes, {free:,} are free (point {knob} at a "
                         "larger disk)")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory to fill; it becomes `path` (replacing an old one) only if the block succeeds.

    For outputs that are directories, such as Hugging Face `save_pretrained` checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _naming(path):
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    with open(file, "rb+") as f:
                        os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, path: Path) -> None:
    """Rename directory `new` to `path`, replacing a directory there: os.replace cannot replace a non-empty
    directory, so the old one is moved aside first and deleted once the new one is in place."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)


@contextlib.contextmanager
def staged_outputs(root: str | Path, published: list[Path] | None = None) -> Iterator[Path]:
    """Yield a staging folder mirroring `root`: what the block writes there replaces the outputs under `root`
    only when the whole block succeeds (files one by one, save_pretrained directories whole); a stage that
    fails halfway leaves every old output as it was. The paths published are appended to `published`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        yield staging
        for path in sorted(staging.rglob("*")):
            if not path.exists():  # inside a directory moved whole
                continue
            target = root / path.relative_to(staging)
            whole = path.is_dir() and (path / "config.json").is_file()  # a save_pretrained directory
            if whole or path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                (_replace_dir if whole else os.replace)(path, target)
                if published is not None:
                    published.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save, atomically and byte-reproducibly: given a path, torch.save names the archive inside after
    the (temp) file, so equal weights would hash differently; given an open file it always writes "archive"."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
