"""Quantization-aware training: `openvino_qat_int8`, an OpenVINO int8 IR whose quantized model was
fine-tuned with its quantization in the loop.

Why NNCF's PyTorch QAT (nncf 3.4): it quantizes the torch model with the same scheme and
settings as the post-training `openvino_int8` (`nncf.quantize`, `optimize.settings.openvino_int8`:
symmetric int8 weights per channel, FakeQuantize on activations, the same calibration images;
only the bias correction is the fast one, the torch backend having no other),
the result trains as an ordinary module, and `ov.convert_model` turns its FakeQuantize nodes into
the IR's int8 layers. torchao's `QATConfig` fake-quantizes Linear and Embedding layers only (on a
CNN: the classifier alone); PT2E's `prepare_qat_pt2e` gives an Inductor or ONNX graph, not the
OpenVINO one whose post-training twin we compare against.

The fine-tune (`optimize.settings.openvino_qat_int8`, `oipipe.deploy.finetune`): `epochs` epochs
over the training split, the validation loss keeping the best; epoch 0 is the post-training model
itself, so with zero epochs, or when no epoch lowers the validation loss, the result is exactly
the post-training model. Each epoch is saved under `paths.cache/qat/<key>`: a killed build
resumes at the next epoch and ends as an uninterrupted one would. The record compares the result
with its own post-training start on the
evaluation images (paired difference, discordant images), beside the usual verdict against fp32.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import OmegaConf

from oipipe.core.config import path
from oipipe.deploy import finetune
from oipipe.deploy.build import BuildContext, BuildFailed
from oipipe.deploy.build_openvino import ir_of_module, nncf_quantizer, save_openvino
from oipipe.measure import evaluation
from oipipe.measure.intervals import paired_counts, paired_difference

log = logging.getLogger("oipipe.deploy.build_qat")

QUANTIZER = "openvino_int8"  # whose quantizer settings QAT starts from: the post-training twin
QAT_SETTINGS = "openvino_qat_int8"  # the fine-tune's block of optimize.settings


def quantize(ctx: BuildContext, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The post-training NNCF quantization of (a copy of) the trained torch model, or of
    `model` (a pruned one): the QAT start."""
    import nncf

    quantizer = nncf_quantizer(ctx, tensors="torch")
    # NNCF's torch backend has only the fast bias correction ("fast_bias_correction=False is
    # not supported"): the one setting where the QAT start differs from its IR twin
    quantizer["fast_bias_correction"] = True
    ctx.notes["qat_start"] = {
        k: str(getattr(v, "value", v)) for k, v in quantizer.items() if k != "calibration_dataset"
    }
    start = copy.deepcopy(ctx.model if model is None else model).eval()
    return nncf.quantize(start, **quantizer)


def work_folder(ctx: BuildContext, pruned: dict[str, Any] | None = None) -> Path:
    """Where a run's epochs are kept: one folder per (checkpoint, settings, prepared data, and
    the pruning the model started from, if any)."""
    blob = {
        "qat": ctx.cfg.optimize.settings[QAT_SETTINGS],
        "quantizer": ctx.cfg.optimize.settings[QUANTIZER],
        "calibration": [ctx.cfg.optimize.calibration_images, ctx.cfg.optimize.calibration_batch],
        "pruned": pruned,
    }
    return finetune.work_folder(ctx, "qat", OmegaConf.to_container(OmegaConf.create(blob)))


def fit(
    ctx: BuildContext,
    model: torch.nn.Module,
    stop_after: int | None = None,
    pruned: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the quantized `model` in place to its best epoch by validation loss
    (`oipipe.deploy.finetune.fit`, `optimize.settings.openvino_qat_int8`), resuming from the
    work folder; returns the facts for the record."""
    settings = cast(dict, OmegaConf.to_container(ctx.cfg.optimize.settings[QAT_SETTINGS]))
    return finetune.fit(ctx, model, work_folder(ctx, pruned), settings, "qat", stop_after)


def against_post_training(
    ctx: BuildContext, start: torch.nn.Module, tuned: torch.nn.Module
) -> dict[str, Any]:
    """The tuned model against its own post-training start, paired, on the evaluation images
    (`optimize.eval_splits`): which of the two to ship at equal speed."""
    images, labels = evaluation.images(
        path(ctx.cfg, "prepared"), ctx.cfg.optimize.eval_splits, ctx.meta
    )
    batches = evaluation.batches(images, ctx.cfg.optimize.eval_batch)
    ptq = np.concatenate(evaluation.logits(start, batches))
    qat = np.concatenate(evaluation.logits(tuned, batches))
    p = paired_difference(*paired_counts(ptq.argmax(1) == labels, qat.argmax(1) == labels))
    return {
        "post_training_top1_pct": round(100 * float((ptq.argmax(1) == labels).mean()), 3),
        "vs_post_training_delta_pct": round(100 * p.delta, 3),
        "vs_post_training_ci_low_pct": round(100 * p.low, 3),
        "vs_post_training_ci_high_pct": round(100 * p.high, 3),
        "vs_post_training_worse": p.worse,
        "vs_post_training_better": p.better,
        "vs_post_training_images": p.n,
    }


def openvino_qat_int8(ctx: BuildContext, dst: Path) -> None:
    """Post-training NNCF int8 of the torch model, fine-tuned with its fake quantization, then
    converted to an OpenVINO IR (batch dynamic, meta.json in rt_info); the build fails when the
    IR runs no layer in int8."""
    qat_ir(ctx, dst, quantize(ctx))


def qat_ir(
    ctx: BuildContext, dst: Path, model: torch.nn.Module, pruned: dict[str, Any] | None = None
) -> None:
    """Fine-tune the quantized `model` (`fit`), compare it with its start, save it as an IR."""
    start = copy.deepcopy(model)
    facts = fit(ctx, model, pruned=pruned)
    ctx.notes.update(facts)
    ctx.notes.update(against_post_training(ctx, start, model))
    save_openvino(ctx, ir_of_module(ctx, model), dst, "int8")
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: no FakeQuantize survived")
    shutil.rmtree(facts["qat_work"], ignore_errors=True)  # built: the epochs are not needed
