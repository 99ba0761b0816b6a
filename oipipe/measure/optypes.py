"""Operator types for the `profile` stage: which aten op is which kind of work, and the sentence
that says where the time goes. Pure Python (no torch), so the report could import it as well.

One registry (`OP_TYPES`) maps an aten op name (as the profiler writes it, `aten::` stripped, or
as a dispatch mode sees it, the overload packet's name) to its type. A convolution is depthwise
when `groups == in_channels > 1`; the profiler shows that through `record_shapes` as a weight of
shape `[out, in / groups = 1, kh, kw]`, the dispatch mode through the `groups` argument itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONV, DEPTHWISE, BATCH_NORM, ACTIVATION = (
    "convolution",
    "depthwise convolution",
    "batch norm",
    "activation",
)
POOLING, LINEAR, ELEMENTWISE, LAYOUT = (
    "pooling",
    "linear/matmul",
    "elementwise add/mul",
    "copies/layout",
)
# Inductor's generated C++ kernels carry no profiler event of their own: their time is the self
# time of the compiled graph's wrapper events, and each fuses batch norm, activations, adds and
# pooling, so they are one type of their own rather than a guess at which op they were.
FUSED, OTHER = "fused (compiled kernels)", "other"
TYPES = (
    CONV,
    DEPTHWISE,
    BATCH_NORM,
    ACTIVATION,
    POOLING,
    LINEAR,
    ELEMENTWISE,
    LAYOUT,
    FUSED,
    OTHER,
)

_NAMES: dict[str, tuple[str, ...]] = {
    CONV: (
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "mkldnn_convolution",
        "_convolution_pointwise",
        "_slow_conv2d_forward",
        "thnn_conv2d",
        "slow_conv_dilated2d",
        "_nnpack_spatial_convolution",
        "_mkl_convolution",
    ),
    BATCH_NORM: (
        "batch_norm",
        "_batch_norm_impl_index",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
    ),
    ACTIVATION: (
        "relu",
        "relu_",
        "relu6",
        "hardtanh",
        "hardtanh_",
        "hardswish",
        "hardswish_",
        "hardsigmoid",
        "hardsigmoid_",
        "silu",
        "silu_",
        "sigmoid",
        "sigmoid_",
        "gelu",
        "tanh",
        "tanh_",
        "leaky_relu",
        "elu",
        "clamp",
        "clamp_",
        "clamp_min",
        "clamp_min_",
        "softmax",
        "_softmax",
    ),
    POOLING: (
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
        "mkldnn_adaptive_avg_pool2d",
        "avg_pool2d",
        "max_pool2d",
        "max_pool2d_with_indices",
        "mean",
        "sum",
        "amax",
    ),
    LINEAR: ("linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "_addmm_activation"),
    ELEMENTWISE: ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "addcmul"),
    LAYOUT: (
        "to",
        "_to_copy",
        "contiguous",
        "copy_",
        "clone",
        "to_dense",
        "to_mkldnn",
        "empty_like",
        "cat",
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "flatten",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "expand",
        "squeeze",
        "unsqueeze",
        "select",
        "slice",
        "alias",
        "detach",
        "dropout",
    ),
}
OP_TYPES: dict[str, str] = {name: kind for kind, names in _NAMES.items() for name in names}
# Ops that return a view: they move no data (0 bytes), however large the tensor.
VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "flatten",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "expand",
        "squeeze",
        "unsqueeze",
        "select",
        "slice",
        "alias",
        "detach",
        "dropout",
    }
)
COMPILED_MARKERS = (
    "CompiledFxGraph",
    "Torch-Compiled Region",
    "cpp_fused",
    "CompiledFunction",
    "inductor",
    "AOTInductor",
)

# A type is memory-bound in the paragraph when it takes at least this share of the time and at
# least this many times its share of the FLOPs.
MIN_TIME_SHARE_PCT, MIN_RATIO = 5.0, 2.0


def op_name(event_name: str) -> str:
    return event_name.removeprefix("aten::").split(".")[0]


def op_type(
    name: str, shapes: Sequence[Sequence[int]] | None = None, groups: int | None = None
) -> str | None:
    """The type of aten op `name`, or None for an op outside the registry.

    A convolution is depthwise if `groups` equals the input's channels (> 1), or, with only the
    shapes (the profiler's `record_shapes`), if its weight has one input channel per group while
    the input has more than one channel."""
    kind = OP_TYPES.get(op_name(name))
    if kind != CONV:
        return kind
    channels = shapes[0][1] if shapes and len(shapes[0]) > 1 else None
    if groups is not None:
        return DEPTHWISE if channels and channels > 1 and groups == channels else CONV
    if shapes and len(shapes) > 1 and len(shapes[1]) > 1:
        return DEPTHWISE if channels and channels > 1 and shapes[1][1] == 1 else CONV
    return CONV


def is_compiled_wrapper(event_name: str) -> bool:
    return any(m in event_name for m in COMPILED_MARKERS)


def summarize(
    seconds: dict[str, float], flops: dict[str, float], nbytes: dict[str, float], calls: int
) -> dict[str, dict[str, float | None]]:
    """Per type, per call: time, its share, FLOPs, their share, achieved GFLOP/s, and FLOPs per
    byte moved. `seconds` are the totals over `calls` calls; `flops` and `nbytes` one call's."""
    total_t = sum(seconds.values()) or 1.0
    total_f = sum(flops.values()) or 1.0
    out: dict[str, dict[str, float | None]] = {}
    for kind in TYPES:
        t, f, b = seconds.get(kind, 0.0) / calls, flops.get(kind, 0.0), nbytes.get(kind, 0.0)
        if not t and not f:
            continue
        out[kind] = {
            "time_ms": t * 1000,
            "time_share_pct": 100 * t * calls / total_t,
            "flops": f,
            "flop_share_pct": 100 * f / total_f,
            "gflops_per_s": f / t / 1e9 if t and f else None,
            "bytes": b,
            "intensity": f / b if b and f else None,
        }
    return out


def memory_bound(types: dict[str, dict]) -> list[str]:
    """The types that take a large share of the time but a much smaller share of the FLOPs,
    by time share, largest first."""
    hits = [
        k
        for k, v in types.items()
        if k not in (OTHER, LAYOUT)
        and v["time_share_pct"] >= max(MIN_TIME_SHARE_PCT, MIN_RATIO * v["flop_share_pct"])
    ]
    return sorted(hits, key=lambda k: -types[k]["time_share_pct"])


def _figures(kind: str, v: dict) -> str:
    parts = [f"{v['time_share_pct']:.0f}% of time", f"{v['flop_share_pct']:.0f}% of FLOPs"]
    if v.get("gflops_per_s") is not None:
        parts.append(f"{v['gflops_per_s']:.1f} GFLOP/s")
    if v.get("intensity") is not None:
        parts.append(f"{v['intensity']:.1f} FLOP/byte")
    return f"{kind}: " + ", ".join(parts)


def paragraph(profile: dict[str, Any]) -> str:
    """Where the time goes, in words, from the profile dict the stage writes (pure)."""
    sentences = []
    for p in profile["profiles"].values():
        types = p["types"]
        bound = memory_bound(types)
        top = max(types, key=lambda k: types[k]["flop_share_pct"]) if types else None
        head = f"{p['mode']} at batch {p['batch']} ({p['total_ms']:.2f} ms per call)"
        if bound:
            said = "; ".join(_figures(k, types[k]) for k in bound)
            s = f"{head}: memory-bound, time well above their FLOP share: {said}."
        else:
            s = f"{head}: no operator type takes much more of the time than of the FLOPs."
        if top and top not in bound:
            s += f" For comparison, {_figures(top, types[top])}."
        sentences.append(s)
    return " ".join(sentences)
