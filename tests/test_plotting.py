"""Every figure labpipe writes can be read: axis labels, a title, a legend for several series (plotting.py)."""

import re

import pytest

from conftest import REPO
from labpipe.plotting import FigureError, pyplot, save_figure


def figure_with(*, xlabel="epoch", ylabel="loss (nats)", title="run wd=0.1", labels=("train", "val"), legend=True):
    figure, axis = pyplot().subplots()
    for i, label in enumerate(labels):
        axis.plot([0, 1], [i, i + 1], label=label)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if legend:
        axis.legend()
    return figure


def test_a_readable_figure_is_written(tmp_path):
    save_figure(figure_with(), tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change,said", [
    ({"xlabel": ""}, "has no x label"),
    ({"ylabel": ""}, "has no y label"),
    ({"title": ""}, "has no title, nor has the figure"),
    ({"legend": False}, "draws 2 labelled series but no legend names 'train'"),
])
def test_an_unreadable_figure_is_refused_naming_the_file_and_nothing_is_written(tmp_path, change, said):
    path = tmp_path / "bad.png"
    with pytest.raises(FigureError, match=re.escape(f"{path}: axis 0 ") + ".*" + re.escape(said)):
        save_figure(figure_with(**change), path)
    assert not path.exists() and pyplot().get_fignums() == []  # closed all the same


def test_shared_axes_colorbars_and_one_unlabelled_reference_line_need_nothing_more(tmp_path):
    plt = pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True)  # x labelled once, at the bottom
    top.plot([0, 1], [0, 1])
    top.axhline(0.5, color="gray")  # an unlabelled reference line: one labelled series or none, no legend needed
    top.set(ylabel="loss (nats)")
    image = bottom.imshow([[0, 1], [1, 0]])
    bottom.set(xlabel="epoch", ylabel="layer")
    figure.colorbar(image, ax=bottom, label="% dormant")
    figure.suptitle("grok_train wd=0.03")
    save_figure(figure, tmp_path / "stacked.png")
    assert (tmp_path / "stacked.png").exists()

    figure, (left, right) = plt.subplots(1, 2, sharey=True)  # the same two series by epoch and by tokens
    for axis, xlabel in ((left, "epoch"), (right, "tokens seen")):
        axis.plot([0, 1], [1, 0], label="full test set")
        axis.plot([0, 1], [2, 1], label="unique test set")
        axis.set(xlabel=xlabel)
    left.set(ylabel="final-token CE (nats)")
    right.legend()  # one legend names the series of both panels
    figure.suptitle("hmm_train H=4 K=100")
    save_figure(figure, tmp_path / "halves.png")
    assert (tmp_path / "halves.png").exists()


def test_every_figure_of_the_package_goes_through_the_checks():
    """savefig is called in plotting.py alone: no stage can write a PNG that skipped check_figure."""
    callers = sorted(str(path.relative_to(REPO)) for path in (REPO / "src" / "labpipe").rglob("*.py")
                     if "savefig(" in path.read_text())
    assert callers == ["src/labpipe/plotting.py"]
