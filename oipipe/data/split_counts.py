"""Per-split statistics tables (image count, per-class count and share), printed and saved."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

STATS_COLUMNS = ["split", "class", "count", "share_pct"]  # stats.csv of download and prepare


def split_stats(items: Iterable[tuple[str, str]], classes: Sequence[str]) -> dict[str, dict]:
    """{split: {"images": n, "classes": {name: (count, share_pct)}}} plus an "all" row."""
    counts: dict[str, Counter] = {}
    for split, name in items:
        counts.setdefault(split, Counter())[name] += 1
    counts["all"] = sum(counts.values(), Counter())
    table = {}
    for split, c in counts.items():
        n = sum(c.values())
        table[split] = {
            "images": n,
            "classes": {k: (c[k], round(100 * c[k] / n, 2) if n else 0.0) for k in classes},
        }
    return table


def stats_rows(table: dict[str, dict]) -> list[tuple]:
    return [
        (split, name, count, share)
        for split, row in table.items()
        for name, (count, share) in row["classes"].items()
    ]


def format_table(table: dict[str, dict], title: str) -> str:
    splits = list(table)
    names = list(next(iter(table.values()))["classes"]) if table else []
    width = max([len(n) for n in names] + [len("images")]) + 2
    lines = [title, "".ljust(width) + "".join(f"{s:>18}" for s in splits)]
    lines.append("images".ljust(width) + "".join(f"{table[s]['images']:>18}" for s in splits))
    for name in names:
        cells = "".join(
            f"{table[s]['classes'][name][0]:>9} ({table[s]['classes'][name][1]:>5.1f}%)"
            for s in splits
        )
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)
