"""Structured (channel) pruning: `openvino_pruned_fp32`, `openvino_pruned_int8` and
`openvino_pruned_qat_int8`, OpenVINO IRs of the trained model with a fraction of its channels
removed, fine-tuned to recover, then left in fp32, quantized after training (NNCF, as
`openvino_int8`) or quantized with training (as `openvino_qat_int8`): the "collaborative" pair.

Why torch-pruning (1.6): it traces the model's dependency graph, so removing an output channel
of one convolution removes the matching input channel of every consumer, the batch norm's entry,
the depthwise convolution's group and the squeeze-excite block's channel with it; the result is a
smaller dense model that every engine runs faster, unlike `torch.nn.utils.prune` or unstructured
sparsity, which only zero weights (no engine here runs a CNN faster for zeros).

`optimize.settings.pruned`: `ratio` of the channels of every prunable layer group removed (the
classifier's outputs never), chosen by `importance` (`l2` or `l1`: the group's weight magnitude),
counts rounded to multiples of `round_to` (SIMD-friendly widths); then the fine-tune of
`oipipe.deploy.finetune` (`epochs`, `lr`, `batch`, `seed`; epoch 0 is the pruned model before
any fine-tune). The pruning is deterministic, so the fine-tuned weights are kept in
`paths.cache/pruned/<key>/final.pt` and shared by the three variants; a killed fine-tune resumes
at its next epoch. A sweep over `optimize.settings.pruned.ratio` (`-m
optimize.settings.pruned.ratio=0.25,0.5`) covers several ratios. The record holds the parameters,
GFLOPs (one image, PyTorch's FlopCounter, as the benchmark counts) and the output channels of
every convolution, before and after, and the pruned network's FLOPs and bytes per op
(`model_counts`), which its benchmark rows and roofline points count instead of the trained
model's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf

from oipipe.core import progress
from oipipe.core.files import atomic_open
from oipipe.deploy import build_qat, finetune
from oipipe.deploy.build import BuildContext
from oipipe.deploy.build_openvino import ir_of_module, nncf_int8, save_openvino
from oipipe.measure import roofline

log = logging.getLogger("oipipe.deploy.build_pruned")

SETTINGS = "pruned"  # the block of optimize.settings every pruned variant reads


def settings(ctx: BuildContext) -> dict[str, Any]:
    return cast(dict, OmegaConf.to_container(ctx.cfg.optimize.settings[SETTINGS]))


def channels(model: torch.nn.Module) -> dict[str, int]:
    """Output channels of every convolution, by module name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: torch.nn.Module, example: torch.Tensor, ratio: float, importance: str, round_to: int
) -> torch.nn.Module:
    """A pruned copy of `model` (deterministic: the same inputs give the same widths)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        m,
        example[:1],
        importance=tp.importance.GroupMagnitudeImportance(p={"l2": 2, "l1": 1}[importance]),
        pruning_ratio=ratio,
        ignored_layers=[mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)],
        round_to=round_to,
    )
    pruner.step()
    return m.eval()


def describe(before: torch.nn.Module, after: torch.nn.Module, size: int) -> dict[str, Any]:
    """The record's facts of a pruning: parameters, GFLOPs and channels before and after, and
    the pruned network's own counts (the benchmark's FLOP/s and roofline of its rows)."""
    counts = roofline.model_counts(after, size)
    was, now = channels(before), channels(after)
    return {
        "params_before": parameters(before),
        "params_after": parameters(after),
        "gflops_before": round(roofline.flops_per_image(before, size) / 1e9, 4),
        "gflops_after": round(counts["flops_per_image"] / 1e9, 4),
        "model_counts": counts,
        "channels_before": was,
        "channels_after": now,
        "pruned_layers": sum(was[k] != now[k] for k in was),
    }


def pruned_model(ctx: BuildContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model pruned as `optimize.settings.pruned` says and fine-tuned, with its
    facts; both from the cache when an earlier pruned variant (or an earlier run) made them."""
    s = settings(ctx)
    with progress.phase(log, f"pruning {s['ratio']:.0%} of the channels ({s['importance']})"):
        model = prune(ctx.model, ctx.example, s["ratio"], s["importance"], s["round_to"])
    work = finetune.work_folder(ctx, SETTINGS, s)
    final = work / "final.pt"
    if final.is_file():
        saved = torch.load(final, weights_only=True)
        model.load_state_dict(saved["model"])
        log.info("pruned and fine-tuned model from %s", final)
        return model.eval(), {**saved["facts"], "pruned_from_cache": True}
    facts = {"pruned_ratio": s["ratio"], "pruned_importance": s["importance"]}
    facts.update(describe(ctx.model, model, ctx.meta["input_size"]))
    facts.update(finetune.fit(ctx, model, work, s, "pruned"))
    facts.pop("pruned_work")
    with atomic_open(final, "wb") as f:
        torch.save({"model": model.state_dict(), "facts": facts}, f)
    (work / "last.pt").unlink(missing_ok=True)  # the epochs are not needed any more
    return model.eval(), {**facts, "pruned_from_cache": False}


def openvino_pruned_fp32(ctx: BuildContext, dst: Path) -> None:
    """The pruned, fine-tuned model as an fp32 IR."""
    model, facts = pruned_model(ctx)
    ctx.notes.update(facts)
    save_openvino(ctx, ir_of_module(ctx, model), dst, "fp32")


def openvino_pruned_int8(ctx: BuildContext, dst: Path) -> None:
    """The pruned, fine-tuned model's IR quantized after training by NNCF, exactly as
    `openvino_int8` quantizes the unpruned one (its settings, the same calibration)."""
    model, facts = pruned_model(ctx)
    ctx.notes.update(facts)
    nncf_int8(ctx, dst, ir_of_module(ctx, model))


def openvino_pruned_qat_int8(ctx: BuildContext, dst: Path) -> None:
    """The pruned, fine-tuned model quantized with training, as `openvino_qat_int8` does."""
    model, facts = pruned_model(ctx)
    ctx.notes.update(facts)
    build_qat.qat_ir(ctx, dst, build_qat.quantize(ctx, model), pruned=settings(ctx))
