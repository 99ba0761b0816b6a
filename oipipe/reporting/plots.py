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
def figure(
    file: Path,
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float],
    dpi: int = 110,
    **subplots: Any,
) -> Iterator[Any]:
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


def benchmark_charts(rows: list[dict], out: Path) -> None:
    """Throughput, latency percentiles and speed-up per variant, one bar group per batch size."""
    import numpy as np

    ok = [r for r in rows if r["status"] == "ok"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sizes = sorted({r["batch"] for r in rows})
    specs = [
        ("throughput", "images / s", "benchmark_throughput.png", ["throughput"]),
        (
            "latency",
            "ms per batch",
            "benchmark_latency.png",
            ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms"],
        ),
        ("speed-up vs eager fp32", "x", "benchmark_speedup.png", ["speedup"]),
    ]
    for title, unit, name, keys in specs:
        with figure(
            out / name,
            1,
            len(sizes),
            squeeze=False,
            figsize=(5 * len(sizes), 0.5 + 0.4 * len(variants)),
        ) as axes:
            for ax, b in zip(axes[0], sizes, strict=True):
                ys = np.arange(len(variants))
                h = 0.8 / len(keys)
                for k, key in enumerate(keys):
                    vals = [
                        next(
                            (
                                r[key]
                                for r in ok
                                if r["variant"] == v and r["batch"] == b and r.get(key) is not None
                            ),
                            0.0,
                        )
                        for v in variants
                    ]
                    ax.barh(ys + k * h, vals, height=h, label=key.replace("latency_", ""))
                for y, v in zip(ys, variants, strict=True):  # say why a bar is missing
                    status = next(
                        (r["status"] for r in rows if r["variant"] == v and r["batch"] == b),
                        "not run",
                    )
                    if status != "ok":
                        ax.text(
                            0,
                            y + h * (len(keys) - 1) / 2,
                            f" {status}",
                            va="center",
                            fontsize=8,
                            color="gray",
                        )
                ax.set_yticks(ys + h * (len(keys) - 1) / 2, variants)
                ax.invert_yaxis()
                ax.set_title(f"{title}, batch {b}")
                ax.set_xlabel(unit)
                if len(keys) > 1:
                    ax.legend(fontsize=7)
