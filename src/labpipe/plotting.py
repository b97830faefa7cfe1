"""Figures the stages write: matplotlib on the Agg backend (stages run headless), PNGs saved atomically."""

from __future__ import annotations

from pathlib import Path

from labpipe.files import atomic_path


def pyplot():
    """matplotlib.pyplot, imported on first use (it is slow to import) with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> None:
    """Write `figure` as a PNG at `path`, whole or not at all, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(figure)
