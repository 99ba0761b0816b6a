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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # a renderer to measure text with (`place_labels`)
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


# Where a label may go around its point, in points (dx, dy, horizontal alignment), in the order
# tried: right, left, above, below, then further out.
_OFFSETS = [
    (5, 3, "left"),
    (-5, 3, "right"),
    (5, -9, "left"),
    (-5, -9, "right"),
    (0, 8, "center"),
    (0, -15, "center"),
    (5, 14, "left"),
    (-5, 14, "right"),
    (5, -21, "left"),
    (-5, -21, "right"),
    (0, 20, "center"),
    (0, -27, "center"),
]


def place_labels(
    ax: Any, points: list[tuple[float, float]], labels: list[str], **text: Any
) -> list:
    """Annotate each point with its label where it overlaps no label placed before it and no
    point (the first free place of `_OFFSETS`; the least overlapping one when none is free).
    Call it once the axes' scales and limits are final. Returns the annotations."""
    fig = ax.figure
    ax.autoscale_view()
    renderer = fig.canvas.get_renderer()
    marks = [ax.transData.transform(p) for p in points]
    placed: list[Any] = []
    out = []
    for (x, y), label in zip(points, labels, strict=True):
        best, best_cost = None, None
        for dx, dy, ha in _OFFSETS:
            ann = ax.annotate(
                label, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, **text
            )
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            cost = sum(_overlap(box, b) for b in placed) + sum(
                box.width * box.height
                for mx, my in marks
                if box.x0 - 3 <= mx <= box.x1 + 3 and box.y0 - 3 <= my <= box.y1 + 3
            )
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (ann, box), cost
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None
        placed.append(best[1])
        out.append(best[0])
    return out


def _overlap(a: Any, b: Any) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def roofline_chart(
    rows: list[dict], roofs: list[tuple[str, float, float]], batches: list[int], file: Path
) -> None:
    """Log-log: achieved GFLOP/s against FLOPs per byte, one dot per (variant, batch) in
    `batches` (hollow at the smallest), under each roof (label, peak GFLOP/s, bandwidth GB/s):
    the bandwidth's slope up to the peak."""
    import numpy as np

    ok = [
        r
        for r in rows
        if r["status"] == "ok" and r["batch"] in batches and r.get("intensity_flop_per_byte")
    ]
    with figure(file, figsize=(8.5, 5.5)) as ax:
        xs = [r["intensity_flop_per_byte"] for r in ok] or [1.0]
        x = np.logspace(np.log10(min(xs) / 4), np.log10(max(xs) * 8), 200)
        styles = ["-", "--", "-.", ":"]
        for k, (name, peak, bw) in enumerate(roofs):
            ax.plot(
                x,
                np.minimum(peak, bw * x),
                styles[k % len(styles)],
                color="grey",
                lw=1,
                label=f"{name} roof: {peak:.0f} GFLOP/s, {bw:.0f} GB/s",
            )
        colour = {"fp32": "tab:blue", "bf16": "tab:green", "fp16": "tab:purple", "int8": "tab:red"}
        small = min(batches)
        for r in ok:
            ax.plot(
                r["intensity_flop_per_byte"],
                r["gflops_per_s"],
                "o",
                color=colour.get(str(r.get("precision")), "black"),
                mfc="white" if r["batch"] == small and len(batches) > 1 else None,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOPs per byte, op-by-op traffic at the row's width)")
        ax.set_ylabel("achieved GFLOP/s")
        sizes = " and ".join(str(b) for b in batches)
        ax.set_title(f"roofline at batch {sizes} (hollow: batch {small}); colour: precision")
        ax.grid(alpha=0.3, which="both")
        if ok:
            ax.legend(fontsize=7, loc="lower right")
            place_labels(
                ax,
                [(r["intensity_flop_per_byte"], r["gflops_per_s"]) for r in ok],
                [f"{r['variant']}@b{r['batch']}" for r in ok],
                fontsize=6,
            )
        else:
            ax.text(0.5, 0.5, "no row measured", ha="center", transform=ax.transAxes)
