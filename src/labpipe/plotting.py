"""Figures the stages write: matplotlib on the Agg backend (stages run headless), PNGs saved atomically.

Every figure is checked before it is written (check_figure): each axis that shows data has both axis labels,
the figure has a title (its own or one per axis), and an axis with several labelled series has them all in a
legend (its own, another panel's or the figure's) that says which is which. A figure without them is a bug in
labpipe, not a user's mistake: it raises.
"""

from __future__ import annotations

from pathlib import Path

from labpipe.files import atomic_path


def pyplot():
    """matplotlib.pyplot, imported on first use (it is slow to import) with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class FigureError(ValueError):
    """A figure that a person could not read: a missing axis label, title or legend."""


def _labelled(axis) -> list[str]:
    """The labels of the axis' series that would appear in a legend (matplotlib hides those starting with _)."""
    artists = [*axis.lines, *axis.collections, *axis.patches, *axis.images]
    return [label for artist in artists if not (label := artist.get_label()).startswith("_")]


def check_figure(figure, path: str | Path) -> None:
    """Raise FigureError naming `path` and the axis when `figure` breaks the rules of the module docstring."""
    shown = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"
             and (axis.lines or axis.collections or axis.patches or axis.images)]
    suptitle = figure.get_suptitle()
    # a legend may serve several panels that draw the same series (one legend for both halves of a figure)
    legends = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None] + figure.legends
    in_legends = {text.get_text() for legend in legends for text in legend.get_texts()}
    for number, axis in enumerate(shown):
        where = f"{path}: axis {number} ({axis.get_title() or 'untitled'})"
        for side in ("x", "y"):
            if not _label(axis, side) and not _shares_a_label(axis, side, shown):
                raise FigureError(f"{where} has no {side} label")
        if not suptitle and not axis.get_title():
            raise FigureError(f"{where} has no title, nor has the figure")
        labelled = _labelled(axis)
        if len(labelled) > 1 and (missing := [label for label in labelled if label not in in_legends]):
            raise FigureError(f"{where} draws {len(labelled)} labelled series but no legend names {missing[0]!r}")
    if not shown:
        raise FigureError(f"{path}: the figure shows no data")


def _label(axis, side: str) -> str:
    return axis.get_xlabel() if side == "x" else axis.get_ylabel()


def _shares_a_label(axis, side: str, axes) -> bool:
    """Axes sharing x or y (subplots(sharex=True)) label it once, on the bottom or the left one."""
    shared = axis.get_shared_x_axes() if side == "x" else axis.get_shared_y_axes()
    return any(other is not axis and _label(other, side) and shared.joined(axis, other) for other in axes)


def write_png(figure, path: str | Path) -> None:
    """Check `figure` and write it as a PNG at `path`, whole or not at all; the figure stays open."""
    path = Path(path)
    check_figure(figure, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def save_figure(figure, path: str | Path) -> None:
    """write_png, then close the figure (also when it is refused)."""
    try:
        write_png(figure, path)
    finally:
        pyplot().close(figure)
