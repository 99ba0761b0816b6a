"""What every build function gets and shares: the build context, the one check of a variant's
requirements, and the pieces more than one backend uses (the fp32-in/out cast, the AOTInductor
package). The build functions themselves are one module per backend (build_torch, build_ort,
build_openvino, build_tensorrt); which one builds a variant is its row's `builder`
(`oipipe.core.variants`)."""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from oipipe.core import progress
from oipipe.core.variants import Variant, imported
from oipipe.measure.machine import bf16_conv_slowdown, cpu_has_native_bf16

log = logging.getLogger("oipipe.deploy.build")


class BuildFailed(RuntimeError):
    """A variant built but is not what was asked for (e.g. FP16 requested, FP32 engine built)."""


class CastIO(nn.Module):
    """Runs `model` in `dtype` behind fp32 inputs and outputs, so every variant is fed alike."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = copy.deepcopy(model).to(dtype), dtype  # never cast the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


@dataclass
class BuildContext:
    cfg: DictConfig
    name: str  # the variant's name
    variant: Variant  # its row
    model: nn.Module  # fp32, eval mode, on CPU; never modified
    meta: dict
    example: torch.Tensor  # a real preprocessed batch (never zeros)
    calibration: Callable[[], Iterator[torch.Tensor]]  # batches of training images
    exported: Path  # the export stage's folder
    notes: dict = field(default_factory=dict)  # facts a build wants in the record

    @property
    def settings(self) -> dict[str, Any]:
        """The variant's block of conf/optimize (`optimize.settings.<name>`, or the block its
        row names: openvino_qdq_int8 quantizes as onnxruntime_int8 does), or {}."""
        block = (self.cfg.optimize.get("settings") or {}).get(self.variant.settings or self.name)
        return cast(dict, OmegaConf.to_container(block)) if block is not None else {}

    def export(self, module: nn.Module, example: torch.Tensor | None = None):
        """torch.export with the batch dimension dynamic up to export.max_batch."""
        x = self.example if example is None else example
        batch = torch.export.Dim("batch", min=1, max=self.cfg.export.max_batch)
        with progress.phase(log, "tracing the model with torch.export"):
            return torch.export.export(module, (x,), dynamic_shapes=({0: batch},))


def aoti_package(ep, dst: Path) -> None:
    """An AOTInductor package of the exported program. Freezing folds weights into constants
    (what makes int8 weight prepacking possible) and must run under no_grad; the configs dict is
    mutated by the call, hence a fresh one."""
    with torch.no_grad(), progress.phase(log, "compiling the AOTInductor package (C++)"):
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(dst), inductor_configs={"freezing": True}
        )


# Each requirement a variant's row may name, and why it is missing here (None: present).
def _cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _torch_tensorrt() -> str | None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch_tensorrt not installed (pip install '.[trt]' on a machine with CUDA)"
    return None


def _native_bf16() -> str | None:
    return None if cpu_has_native_bf16() else "no native bf16 on this CPU (AVX512-BF16 or AMX)"


def _bf16_not_emulated() -> str | None:
    if cpu_has_native_bf16():
        return None
    return (
        "bf16 would be emulated: this CPU has neither avx512_bf16 nor amx_bf16, and a bf16 "
        f"convolution ran {bf16_conv_slowdown():.1f}x slower than fp32 on it; "
        "optimize.allow_emulated=true builds and times it anyway"
    )


REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "cuda": _cuda,
    "torch_tensorrt": _torch_tensorrt,
    "native_bf16": _native_bf16,
    "bf16_not_emulated": _bf16_not_emulated,
}
# Requirements that `optimize.allow_emulated=true` waives: the variant runs without them, slowly.
EMULABLE = frozenset({"bf16_not_emulated"})


def missing(requires: tuple[str, ...], allow_emulated: bool = False) -> str | None:
    """Why a variant with these requirements cannot be built here (the first missing one), or
    None. `package:<module>` is a Python package that must be importable; with `allow_emulated`
    the EMULABLE requirements are not asked."""
    for need in requires:
        if allow_emulated and need in EMULABLE:
            continue
        kind, _, module = need.partition(":")
        if kind == "package":
            reason = (
                None
                if importlib.util.find_spec(module) is not None
                else f"the {module} package is not installed"
            )
        elif need in REQUIREMENTS:
            reason = REQUIREMENTS[need]()
        else:
            raise ValueError(
                f"unknown requirement {need!r}; expected package:<module> or one "
                f"of {sorted(REQUIREMENTS)}"
            )
        if reason:
            return reason
    return None


def build(ctx: BuildContext, dst: Path) -> None:
    """Build the context's variant into `dst` with the function its row names."""
    imported(ctx.variant.builder)(ctx, dst)
