"""What each compression did: the report's compression table and its sentences (pure: records,
benchmark.json and profile.json in, rows and words out).

A compression is a variant whose row in `oipipe.core.variants` names a `twin`: the same engine
uncompressed (`openvino_int8` and `openvino_pruned_fp32` against `openvino_fp32`,
`onnxruntime_int8` against `onnxruntime_fp32`, ...). Against its twin, each row says what the
compression did to FLOPs, to bytes moved, to parameters, to the artifact's size, to time at
every batch size the benchmark ran (the median of the per-round ratios of the two throughputs)
and to top-1, and one sentence says whether it paid and, where it did not, why: the profile
stage's memory-bound operator types (`oipipe.measure.optypes.memory_bound`), whose time does not
shrink with the FLOPs.

Bytes moved per image at batch b: the op-by-op count of one eager call (`fixed / b + per_image`,
benchmark.json's `traffic`, or the record's `model_counts` for a network of its own) at the
precision's element width; an engine that fuses moves less, so these are upper bounds, alike for
both sides.
"""

from __future__ import annotations

import statistics
from typing import Any

from oipipe.core.variants import VARIANTS
from oipipe.measure.optypes import memory_bound
from oipipe.reporting.document import accuracy_text

WIDTH = {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5, "int8": 0.25}  # of fp32's bytes
PAYS = 1.10  # a compression "paid" when it is at least this much faster than its twin


def _row(bench: dict, variant: str, batch: int) -> dict | None:
    r = (bench.get("rows") or {}).get(f"{variant}.b{batch}")
    return r if r and r.get("status") == "ok" and r.get("throughput") else None


def speed_ratio(mine: dict, theirs: dict) -> float:
    """`mine`'s speed over `theirs`: the median of per-round ratios where both were timed in
    the same interleaved rounds (as the benchmark's speed-ups), else the ratio of throughputs."""
    a, b = mine.get("throughput_rounds") or [], theirs.get("throughput_rounds") or []
    if a and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return mine["throughput"] / theirs["throughput"]


def _counts(rec: dict, bench: dict) -> tuple[float | None, float | None, float | None]:
    """(FLOPs per image, fixed bytes, bytes per image) of the network the record ran."""
    own = rec.get("model_counts")
    if own:
        return own["flops_per_image"], own["fixed_bytes"], own["bytes_per_image"]
    traffic = bench.get("traffic") or {}
    flops = bench.get("gflops_per_image")
    return (
        flops * 1e9 if flops is not None else None,
        traffic.get("fixed_bytes"),
        traffic.get("bytes_per_image"),
    )


def bytes_per_image(rec: dict, bench: dict, batch: int) -> float | None:
    _, fixed, per_image = _counts(rec, bench)
    if fixed is None or per_image is None:
        return None
    return (fixed / batch + per_image) * WIDTH.get(str(rec.get("precision")), 1.0)


def params(rec: dict) -> tuple[int | None, int | None]:
    """(twin's parameters, the compression's): only a pruned record counts them; a quantized
    network keeps its parameters (stored narrower: the size column shows that)."""
    before = rec.get("params_before")
    return before, rec.get("params_after", before)


def table(records: dict[str, dict], bench: dict) -> list[dict[str, Any]]:
    """One row per built compression whose twin was built too, in the variants table's order."""
    batches = sorted({int(k.rsplit(".b", 1)[1]) for k in bench.get("rows") or {}})
    out = []
    for name, variant in VARIANTS.items():
        rec, twin = records.get(name), records.get(variant.twin or "")
        if not variant.twin or not rec or not twin:
            continue
        if rec.get("status") != "ok" or twin.get("status") != "ok":
            continue
        flops, _, _ = _counts(rec, bench)
        twin_flops, _, _ = _counts(twin, bench)
        before, after = params(rec)
        time = {}
        for b in batches:
            mine, theirs = _row(bench, name, b), _row(bench, variant.twin, b)
            time[b] = round(speed_ratio(mine, theirs), 3) if mine and theirs else None
        out.append(
            {
                "variant": name,
                "twin": variant.twin,
                "compression": variant.compression,
                "gflops": flops / 1e9 if flops is not None else None,
                "twin_gflops": twin_flops / 1e9 if twin_flops is not None else None,
                "mb_moved_b1": _mb(bytes_per_image(rec, bench, 1)),
                "twin_mb_moved_b1": _mb(bytes_per_image(twin, bench, 1)),
                "params": after,
                "twin_params": before,
                "size_mb": rec.get("size_mb"),
                "twin_size_mb": twin.get("size_mb"),
                "speed_ratio": time,  # throughput over the twin's, per batch size
                "top1_pct": rec.get("top1_pct"),
                "top1_ci_low_pct": rec.get("top1_ci_low_pct"),
                "top1_ci_high_pct": rec.get("top1_ci_high_pct"),
                "eval_images": rec.get("eval_images"),
                "twin_top1_pct": twin.get("top1_pct"),
                "verdict": rec.get("verdict"),
            }
        )
    return out


def _mb(b: float | None) -> float | None:
    return b / 1e6 if b is not None else None


def _pct_change(new: float | None, old: float | None) -> str | None:
    if new is None or not old:
        return None
    return f"{100 * (new / old - 1):+.0f}%"


def why_not(profile: dict | None) -> str | None:
    """The profile's memory-bound operator types, in words ("depthwise convolution 41% of the
    time for 6% of the FLOPs"), from its first profile (eager fp32)."""
    if not profile or not profile.get("profiles"):
        return None
    p = next(iter(profile["profiles"].values()))
    types = p.get("types") or {}
    bound = memory_bound(types)
    if not bound:
        return None
    said = ", ".join(
        f"{k} {types[k]['time_share_pct']:.0f}% of the time for "
        f"{types[k]['flop_share_pct']:.0f}% of the FLOPs"
        for k in bound
    )
    return (
        f"in the fp32 model's profile ({p.get('mode')} at batch {p.get('batch')}) {said}: "
        "memory-bound work that fewer FLOPs do not shorten"
    )


def top1_text(row: dict) -> str:
    """The compression's top-1 with its interval and images, as every accuracy in the report."""
    return accuracy_text(
        row.get("top1_pct"),
        row.get("top1_ci_low_pct"),
        row.get("top1_ci_high_pct"),
        row.get("eval_images"),
    )


def sentence(row: dict, reference_batch: int, profile: dict | None) -> str:
    """Whether the compression paid at the reference batch size, and why not where it did not."""
    name, twin = row["variant"], row["twin"]
    ratio = row["speed_ratio"].get(reference_batch)
    flops = _pct_change(row["gflops"], row["twin_gflops"])
    moved = _pct_change(row["mb_moved_b1"], row["twin_mb_moved_b1"])
    what = ", ".join(
        x
        for x in (
            f"FLOPs {flops}" if flops and flops != "+0%" else "the same FLOPs",
            f"bytes moved {moved}" if moved else None,
            f"top-1 {top1_text(row)} ({row['verdict']}; the twin's {row['twin_top1_pct']:.1f}%)"
            if row.get("top1_pct") is not None and row.get("twin_top1_pct") is not None
            else None,
        )
        if x
    )
    if ratio is None:
        return f"`{name}` ({row['compression']}): {what}; not timed against `{twin}`."
    head = f"`{name}` ({row['compression']}): {what}; {ratio:.2f}x `{twin}`'s speed at batch "
    if ratio >= PAYS:
        return f"{head}{reference_batch}: it paid."
    reason = why_not(profile)
    return f"{head}{reference_batch}: it did not pay" + (f"; {reason}." if reason else ".")
