"""FLOPs and bytes moved per operator type, counted under a `TorchDispatchMode` on one eager call:
every aten op is seen (functional adds and multiplies included, which module hooks miss);
convolution and matmul FLOPs as `torch.utils.flop_counter` counts them, bytes as every op's
inputs read and outputs written (views move none). The profile stage's per-type figures and the
benchmark's roofline intensity (`oipipe.measure.roofline`) both come from here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from oipipe.measure import optypes


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def op_flops(name: str, args: tuple, out: Any) -> float:
    """FLOPs of one aten op call (see the module docstring for what counts)."""
    kind = optypes.OP_TYPES.get(name)
    outs = _tensors(out)
    out_numel = sum(t.numel() for t in outs)
    if kind == optypes.CONV:
        w = args[1]
        # 2 * output elements * (in channels per group * kernel area): flop_counter's conv_flop
        return 2.0 * outs[0].numel() * (w.numel() // w.shape[0])
    if kind == optypes.LINEAR:
        # 2 * output elements * the reduced dimension, whichever of linear (weight [out, in]),
        # mm, matmul, addmm or bmm it is
        a = args[1] if name in ("addmm", "baddbmm", "_addmm_activation") else args[0]
        return 2.0 * outs[0].numel() * a.shape[-1]
    if kind == optypes.BATCH_NORM:
        return 2.0 * out_numel  # eval: one scale and one shift per element
    if kind in (optypes.ACTIVATION, optypes.ELEMENTWISE):
        return float(out_numel)
    if kind == optypes.POOLING:
        return float(args[0].numel())
    return 0.0


class OpCounter(TorchDispatchMode):
    """FLOPs and bytes moved per operator type, summed over the aten ops of the calls made."""

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        groups = args[8] if name == "convolution" and len(args) > 8 else None
        shapes = [list(t.shape) for t in _tensors(args)]
        kind = optypes.op_type(name, shapes, groups) or optypes.OTHER
        self.flops[kind] += op_flops(name, args, out)
        if name not in optypes.VIEW_OPS:
            self.bytes[kind] += sum(
                t.numel() * t.element_size() for t in _tensors(args) + _tensors(out)
            )
        return out
