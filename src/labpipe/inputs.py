"""Reading the files a stage is handed: any failure is an InputError whose one line names the file.

A file a user can bring (a dataset, a model, a manifest, a checkpoint) can be truncated, random, of another
kind or written by someone else; what went wrong is reported as `PATH: what it should be (why not)`, never as
a library's traceback. Torch files are loaded with weights_only=True: a pickle someone hands you cannot run
code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from labpipe.errors import InputError


def reason(error: BaseException) -> str:
    """The first line of an exception's message, for a one-line error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def is_model_uri(source: str) -> bool:
    """models:/name@alias, models:/name/version or runs:/<id>/model: a model in the MLflow store (loaded by
    tracking.load_logged_model)."""
    return re.match(r"^(models|runs):/", source) is not None


def read_text(path: str | Path) -> str:
    path = Path(path)
    _exists(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x})") from None


def read_json(path: str | Path, what: str = "JSON", keys: tuple[str, ...] = ()) -> Any:
    """A JSON file; with `keys`, a JSON object that has all of them."""
    path = Path(path)
    text = read_text(path)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid {what} (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if keys:
        if not isinstance(record, dict):
            raise InputError(f"{path}: {what} must be a JSON object, got {type(record).__name__}")
        missing = [key for key in keys if key not in record]
        if missing:
            raise InputError(f"{path}: {what} lacks the key(s) {', '.join(missing)}")
    return record


def load_torch(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> Any:
    """A torch.save file loaded safely (tensors, containers and plain values only); with `keys`, a dict that
    has all of them: "not a labpipe HMM checkpoint: PATH" rather than a KeyError later."""
    import torch

    path = Path(path)
    _exists(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, random, unsafe or of another kind: all mean "not usable"
        raise InputError(f"{path}: not a {what} ({reason(error)})") from None
    lacking = [key for key in keys if not isinstance(obj, dict) or key not in obj]
    if lacking:
        raise InputError(f"{path}: not a {what} (it lacks {', '.join(lacking)})")
    return obj


def from_pretrained(loader: Any, path: str | Path, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)` (a Hugging Face class) for a local directory, its failures named."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as error:  # noqa: BLE001 - a broken config.json or weights file: the directory is unusable
        raise InputError(f"{path}: not a usable {what} ({reason(error)})") from None


def _exists(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
