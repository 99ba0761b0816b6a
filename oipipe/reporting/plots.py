"""Charts saved as PNG files: drawn on a bare matplotlib `Figure`, written atomically.

The figure is built without `pyplot`, as matplotlib advises for code that only writes files: no
GUI backend is chosen or needed (`savefig` renders a PNG with Agg whatever the backend), and no
global figure registry keeps a figure alive, so there is nothing to close and nothing leaks when
drawing fails. Nothing here imports matplotlib until a chart is drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oipipe.core.files import atomic_open


@contextlib.contextmanager
def figure(file: Path, nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
           dpi: int = 110, **subplots: Any) -> Iterator[Any]:
    """The axes of a new figure (as `plt.subplots` returns them; `subplots` takes its `squeeze`,
    `sharey`, ...); when the block ends, the figure is laid out and written to `file` as a PNG.

    The PNG goes to a temp file that replaces `file` only once it is complete: if drawing or
    rendering fails, the previous `file` stays as it was."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    yield fig.subplots(nrows, ncols, **subplots)
    fig.tight_layout()
    with atomic_open(file, "wb") as f:
        fig.savefig(f, format="png")
