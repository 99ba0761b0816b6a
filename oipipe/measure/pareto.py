"""Speed against accuracy: the rule that picks what to ship, the Pareto frontier, and its chart.

A library module (CONVENTIONS 11) shared by the `benchmark` stage (variants of one trained model)
and the `compare` entry point (variants of every job of a sweep). It works on plain dicts with the
keys the benchmark writes per row: `status`, `verdict`, `throughput` (images/s), `top1`,
`top1_ci_low`, `top1_ci_high` (percent), `eval_images`. Nothing here imports torch; matplotlib is
imported only when a chart is drawn.
"""

from __future__ import annotations

from pathlib import Path

from oipipe.reporting.plots import figure, place_labels

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


# Ties on speed go to the better verdict (`pass` before `undecided`), then the higher top-1,
# then the smaller artifact.
VERDICT_ORDER = {"pass": 0, "undecided": 1}
TIE_MARGIN_PCT = 5.0  # benchmark.tie_margin_pct's default, for callers without a config


def speeds_tie(fast: dict, other: dict, key: str = "throughput", margin_pct: float = 5.0) -> bool:
    """Whether `other` is not told apart from `fast` (the faster by `key`) by their trials.

    Measured in the same rounds (both rows carry `<key>_rounds` of one length, as the
    benchmark's interleaved rows do): a tie when `other` was as fast in some round (the lowest
    per-round ratio is at most 1) or the median ratio is within `margin_pct`. Rows measured
    apart (`compare`'s rows of different jobs): a tie when the trials' spreads overlap
    (`<key>_min` of the faster at most `<key>_max` of the other) or the medians are within the
    margin."""
    a, b = fast.get(f"{key}_rounds"), other.get(f"{key}_rounds")
    if a and b and len(a) == len(b):
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        ratios.sort()
        median = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2
        return ratios[0] <= 1.0 or median < 1 + margin_pct / 100
    if fast[key] < other[key] * (1 + margin_pct / 100):
        return True
    low, high = fast.get(f"{key}_min"), other.get(f"{key}_max")
    return low is not None and high is not None and low <= high


def fastest_shippable(
    rows: list[dict], key: str = "throughput", margin_pct: float = TIE_MARGIN_PCT
) -> dict | None:
    """The row to ship: the fastest measured row whose accuracy verdict is not `fail`, unless
    rows whose speeds tie with it (`speeds_tie`) are better on verdict, then top-1, then size;
    None when there is none. The result is a copy of the chosen row with `tied`: the other rows
    whose speed tied with the fastest (empty when the fastest won outright).
    `key`: throughput (one call at a time) or throughput_concurrent (the throughput mode)."""
    ok = [
        r for r in rows if r.get("status") == "ok" and r.get("verdict") in SHIPPABLE and r.get(key)
    ]
    if not ok:
        return None
    fastest = max(ok, key=lambda r: r[key])
    tied = [r for r in ok if r is fastest or speeds_tie(fastest, r, key, margin_pct)]

    def order(r: dict) -> tuple[int, float, float, float]:
        top1, size = r.get("top1_pct"), r.get("size_mb")
        return (
            VERDICT_ORDER[r["verdict"]],
            -float(top1) if top1 is not None else 1.0,
            float(size) if size is not None else float("inf"),
            -float(r[key]),
        )

    best = min(tied, key=order)
    return {**best, "tied": [r for r in tied if r is not best]}


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
        # a log axis: fifteen variants from 3 to 800 images/s stay apart, and equal ratios
        # look equal; labels go where they overlap no other label or point
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter

        # 200, not 2x10^2; between the decades only 2x and 5x, so labels never crowd
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
        )
        sizes = sorted({p["eval_images"] or 0 for p in points})
        n = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"  # jobs may differ
        ax.set_xlabel(f"throughput at batch {batch} (images/s)")
        ax.set_ylabel(f"top-1 (%), 95% Wilson interval, {n if points else 0} images")
        ax.set_title("speed against accuracy (blue pass, orange undecided, red fail)")
        ax.grid(alpha=0.3)
        if points:
            place_labels(
                ax,
                [(p["throughput"], p["top1_pct"]) for p in points],
                [str(p[label]) for p in points],
                fontsize=7,
            )
        else:
            ax.text(0.5, 0.5, "no variant measured", ha="center", transform=ax.transAxes)
