"""`oipipe.reporting.plots.figure`: every chart is written through it, atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.artist import Artist
from PIL import Image

from oipipe.reporting.plots import figure


def test_a_chart_is_a_png_of_its_size_and_leaves_no_temp_file(tmp_path) -> None:
    file = tmp_path / "plots" / "chart.png"  # the folder is made
    with figure(file, 1, 2, figsize=(4, 2), dpi=50) as (left, right):
        left.plot([0, 1], [0, 1])
        right.bar([0, 1], [2, 1])
    with Image.open(file) as im:
        assert (im.format, im.size) == ("PNG", (200, 100))
    assert [p.name for p in file.parent.iterdir()] == ["chart.png"]


class FailsWhenDrawn(Artist):
    """An artist whose drawing fails inside `savefig`; it notes what the folder held then."""

    def __init__(self, file: Path) -> None:
        super().__init__()
        self.file, self.seen = file, None
        self.set_in_layout(False)

    def draw(self, renderer) -> None:
        self.seen = (self.file.read_bytes(), sorted(p.name for p in self.file.parent.iterdir()))
        raise RuntimeError("drawing failed")


def test_a_chart_that_fails_to_render_leaves_the_previous_png(tmp_path) -> None:
    file = tmp_path / "chart.png"
    Image.new("RGB", (3, 2), "red").save(file)
    old = file.read_bytes()
    with pytest.raises(RuntimeError, match="drawing failed"):
        with figure(file, figsize=(2, 2)) as ax:
            ax.plot([0, 1], [1, 0])
            artist = ax.add_artist(FailsWhenDrawn(file))
    # While the PNG was being rendered, it went to a temp file beside the old one.
    held, names = artist.seen
    assert held == old
    assert len(names) == 2 and any(
        n.startswith(".chart.png.") and n.endswith(".tmp") for n in names
    ), names
    # After the failure: the old PNG, whole, and no temp file.
    assert file.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_a_chart_whose_drawing_code_raises_writes_nothing(tmp_path) -> None:
    file = tmp_path / "chart.png"
    with pytest.raises(ZeroDivisionError):
        with figure(file, figsize=(2, 2)) as ax:
            ax.plot([0, 1], [1 / 0, 0])
    assert list(tmp_path.iterdir()) == []
