"""The dormancy CSV: its columns (exactly, in this order: the lab's format), reading and appending it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from labpipe.errors import InputError
from labpipe.files import atomic_path
from labpipe.inputs import reason

COLUMNS = ["timestamp", "model", "revision", "step", "threshold", "layer_name", "layer_index", "num_neurons",
           "num_dormant", "pct_dormant", "avg_activation", "max_activation"]


def read_results(path: str | Path) -> pd.DataFrame:
    """The CSV, or an empty frame; ValueError when its columns are not exactly COLUMNS."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    # Names as strings even when they look like numbers (a revision that is a commit hash of digits)
    try:
        frame = pd.read_csv(path, dtype={"model": str, "revision": str, "layer_name": str})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as error:
        raise InputError(f"{path}: not a dormancy results CSV ({reason(error)})") from None
    if list(frame.columns) != COLUMNS:
        raise InputError(f"{path} has columns {list(frame.columns)}, not {COLUMNS}: refusing to append to it "
                         "(choose another output CSV)")
    return frame


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """The old rows plus the new ones, the whole file rewritten atomically: readers never see half a revision."""
    old, new = read_results(path), pd.DataFrame(rows, columns=COLUMNS)
    frame = new if old.empty else pd.concat([old, new], ignore_index=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
