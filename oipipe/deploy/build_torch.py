"""Build functions of the PyTorch variants: eager programs cast to bf16/fp16 and AOTInductor
packages (fp32, bf16, torchao PT2E int8, fp16 on CUDA). Each is `(ctx, dst)`, named by its
variant's row in `oipipe.core.variants`."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import torch

from oipipe.deploy.build import BuildContext, BuildFailed, CastIO, aoti_package
from oipipe.measure.machine import cpu_has_native_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_bf16(ctx: BuildContext, dst: Path) -> None:
    ctx.notes["native_bf16"] = cpu_has_native_bf16()
    ep = ctx.export(CastIO(ctx.model, torch.bfloat16))
    torch.export.save(ep, str(dst))


def inductor(ctx: BuildContext, dst: Path) -> None:
    """AOTInductor package of the model in the row's precision (fp32, or bf16 behind fp32 I/O)."""
    dtype = DTYPES[ctx.variant.precision]
    module = ctx.model if dtype == torch.float32 else CastIO(ctx.model, dtype)
    if dtype == torch.bfloat16:
        ctx.notes["native_bf16"] = cpu_has_native_bf16()
    aoti_package(ctx.export(module), dst)


def inductor_int8(ctx: BuildContext, dst: Path) -> None:
    """torchao PT2E static quantization (X86InductorQuantizer), compiled by Inductor ahead of time.

    The int8 graph goes through the same Inductor compiler as `torch.compile`, but as an
    AOTInductor package: a `torch.compile`d module cannot be saved, a package reloads in a fresh
    process without torchao. torchao's quantizer module must be imported in the compiling
    process (it registers the int8 fusion passes); without it, or without no_grad + freezing,
    the package silently runs fp32 convolutions (pytorch/ao#4566), hence the check below.
    Settings: `optimize.settings.inductor_int8` (the quantization config's arguments).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(**ctx.settings))
    prepared = prepare_pt2e(ctx.export(ctx.model).module(), quantizer)
    seen = 0
    with torch.no_grad():
        for batch in ctx.calibration():
            prepared(batch)
            seen += len(batch)
    ctx.notes["calibration_images"] = seen
    converted = convert_pt2e(prepared)
    aoti_package(ctx.export(converted), dst)
    kernels = count_int8_kernels(dst)
    ctx.notes["int8_kernels"] = kernels
    if kernels == 0:
        raise BuildFailed(
            "the AOTInductor package has no int8 (qconv/qlinear) kernel: Inductor "
            "fell back to fp32 (pytorch/ao#4566)"
        )


def count_int8_kernels(package: Path) -> int:
    """How many oneDNN int8 convolution/linear calls the package's generated C++ makes."""
    with zipfile.ZipFile(package) as z:
        sources = [
            z.read(n).decode(errors="replace") for n in z.namelist() if n.endswith("wrapper.cpp")
        ]
    return sum(s.count("_qconv") + s.count("_qlinear") for s in sources)


def eager_fp16_cuda(ctx: BuildContext, dst: Path) -> None:
    half = copy.deepcopy(ctx.model).to("cuda", torch.float16)
    torch.export.save(ctx.export(half, ctx.example.to("cuda", torch.float16)), str(dst))


def inductor_fp16_cuda(ctx: BuildContext, dst: Path) -> None:
    """AOTInductor on CUDA in half precision (Triton kernels), fp32 in and out; no TensorRT.

    CUDA graphs are a `torch.compile` runtime feature (`triton.cudagraphs`), not one of an
    AOTInductor package, so this variant runs without them; max-autotune is off (minutes of
    build per shape). Never run here: no GPU on the machines this was written on.
    """
    module = CastIO(ctx.model, torch.float16).to("cuda")
    ep = ctx.export(module, ctx.example.to("cuda"))
    aoti_package(ep, dst)
    ctx.notes.update({"cuda_graphs": False, "max_autotune": False})
