"""Speed against accuracy: the rule that picks what to ship, the Pareto frontier, and its chart.

A library module (CONVENTIONS 11) shared by the `benchmark` stage (variants of one trained model)
and the `compare` entry point (variants of every job of a sweep). It works on plain dicts with the
keys the benchmark writes per row: `status`, `verdict`, `throughput` (images/s), `top1`,
`top1_ci_low`, `top1_ci_high` (percent), `eval_images`. Nothing here imports torch; matplotlib is
imported only when a chart is drawn.
"""

from __future__ import annotations

from pathlib import Path

from oipipe.reporting.plots import figure

# The accuracy verdicts a variant may ship with: `undecided` is kept (and labelled by whoever
# reports it), `fail` never ships however fast it is.
SHIPPABLE = ("pass", "undecided")

PARETO_COLUMNS = [
    "variant",
    "verdict",
    "throughput",
    "top1_pct",
    "top1_ci_low_pct",
    "top1_ci_high_pct",
    "eval_images",
    "on_frontier",
]


def fastest_shippable(rows: list[dict], key: str = "throughput") -> dict | None:
    """The fastest measured row whose accuracy verdict is not `fail`; None when there is none.
    `key`: throughput (one call at a time) or throughput_concurrent (the throughput mode)."""
    ok = [
        r for r in rows if r.get("status") == "ok" and r.get("verdict") in SHIPPABLE and r.get(key)
    ]
    return max(ok, key=lambda r: r[key], default=None)


def mark_frontier(points: list[dict]) -> list[dict]:
    """Sets `on_frontier` on each point (no other point is at least as fast and at least as
    accurate, and better in one of the two); returns them sorted by throughput."""
    for p in points:
        p["on_frontier"] = not any(
            q["throughput"] >= p["throughput"]
            and q["top1_pct"] >= p["top1_pct"]
            and (q["throughput"] > p["throughput"] or q["top1_pct"] > p["top1_pct"])
            for q in points
        )
    return sorted(points, key=lambda p: p["throughput"])


def pareto_points(rows: list[dict], batch: int) -> list[dict]:
    """One point per variant measured at `batch`, with `on_frontier`."""
    return mark_frontier(
        [
            {k: r.get(k) for k in PARETO_COLUMNS if k != "on_frontier"}
            for r in rows
            if r["batch"] == batch
            and r["status"] == "ok"
            and r.get("top1_pct") is not None
            and r.get("throughput")
        ]
    )


def pareto_chart(
    points: list[dict], batch: int, baseline: str, file: Path, label: str = "variant"
) -> None:
    """Throughput against top-1 with its 95% interval, one point per variant, frontier drawn.

    `label` is the key each point is annotated with (`compare` passes `job/variant`); points whose
    `variant` is `baseline` are drawn hollow."""
    with figure(file, figsize=(7.5, 4.8)) as ax:
        colour = {"pass": "tab:blue", "undecided": "tab:orange", "fail": "tab:red"}
        for p in points:
            err = [[p["top1_pct"] - p["top1_ci_low_pct"]], [p["top1_ci_high_pct"] - p["top1_pct"]]]
            ax.errorbar(
                p["throughput"],
                p["top1_pct"],
                yerr=err,
                fmt="o",
                capsize=3,
                color=colour.get(p["verdict"], "grey"),
                mfc="white" if p["variant"] == baseline else None,
            )
            # labels run down beside each point's interval: variants of equal accuracy sit on one
            # horizontal line, where horizontal labels would overlap
            ax.annotate(
                p[label],
                (p["throughput"], p["top1_pct"]),
                textcoords="offset points",
                xytext=(4, -4),
                fontsize=7,
                rotation=-90,
                ha="left",
                va="top",
            )
        front = [p for p in points if p["on_frontier"]]
        if front:
            ax.plot(
                [p["throughput"] for p in front],
                [p["top1_pct"] for p in front],
                "--o",
                color="grey",
                mfc="none",
                ms=11,
                lw=1,
                label="Pareto frontier",
            )
            ax.legend(fontsize=8, loc="lower left")
        ax.margins(x=0.12, y=0.15)
        sizes = sorted({p["eval_images"] or 0 for p in points})
        n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"  # jobs may differ
        ax.set_xlabel(f"throughput at batch {batch} (images/s)")
        ax.set_ylabel(f"top-1 (%), 95% Wilson interval, {n if points else 0} images")
        ax.set_title("speed against accuracy (blue pass, orange undecided, red fail)")
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no variant measured", ha="center", transform=ax.transAxes)
