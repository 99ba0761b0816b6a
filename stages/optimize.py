"""Stage `optimize`: one optimized variant of the trained model per entry of `optimize.variants`.

DVC runs one instance per variant (`optimize@int8`, ...), so a failing variant never erases the
others. Each instance writes, under `paths.optimized/<variant>/`:

    <artifact>    the deployable file (AOTInductor package, ONNX, OpenVINO IR (model.xml with
                  model.bin beside it), ExportedProgram, TRT program)
    meta.json     classes, normalisation and input size, so the artifact can be loaded alone
    record.json   status (ok | skipped | failed), reason or error, artifact path (relative to
                  `paths.root`), size, build time, and its accuracy against the fp32 model on
                  the held-out images (`optimize.eval_splits`, by default val + test): top-1
                  with its Wilson interval, the paired difference with its interval, agreement,
                  exact McNemar, and the verdict against the precision's bar: pass, fail or
                  undecided (with how many images would decide it), see oipipe/measure/intervals.py

and the same record, flat, as `paths.metrics/optimize/<variant>.json` (DVC metrics). An expected
failure (the compiler raised, TensorRT built FP32 when FP16 was asked for) is recorded as `failed`
and the stage exits 0 so the benchmark can show the row; bad input (no checkpoint, unknown variant,
empty training split to calibrate on) is an error before any work.

What a variant is and how it loads lives in `oipipe.deploy.runtime.VARIANTS` (shared with the
benchmark
and the stream client); this module adds how each is built. Every variant is loaded back from disk
before it is evaluated, the way every consumer loads it:
`oipipe.deploy.runtime.load_variant(folder)`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import sys
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import ConfigError, InputError
from oipipe.core.files import atomic_dir, write_json
from oipipe.core.tracking import stage_run, verdict_code
from oipipe.core.variants import OPTIMIZE_VARIANTS
from oipipe.data.datasets import PreparedImages
from oipipe.deploy import trt_layers
from oipipe.deploy.runtime import (
    EXPORT_FILES,
    META,
    OPENVINO_META,
    OPENVINO_PRECISIONS,
    RECORD,
    Runtime,
    VariantSpec,
    openvino_compile,
    variant_spec,
)
from oipipe.deploy.runtime import (
    VARIANTS as SPECS,
)
from oipipe.measure import evaluation
from oipipe.measure.machine import cpu_flags, cpu_has_native_bf16
from oipipe.training import models

log = logging.getLogger("stages.optimize")


class BuildFailed(RuntimeError):
    """A variant built but is not what was asked for (e.g. FP16 requested, FP32 engine built)."""


class CastIO(nn.Module):
    """Runs `model` in `dtype` behind fp32 inputs and outputs, so every variant is fed alike."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = copy.deepcopy(model).to(dtype), dtype  # never cast the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


# --- what each build gets --------------------------------------------------------------------


@dataclass
class BuildContext:
    cfg: DictConfig
    model: nn.Module            # fp32, eval mode, on CPU; never modified
    meta: dict
    example: torch.Tensor       # a real preprocessed batch (never zeros)
    calibration: Callable[[], Iterator[torch.Tensor]]  # batches of training images
    exported: Path              # the export stage's folder
    notes: dict = field(default_factory=dict)  # facts a build wants in the record

    def export(self, module: nn.Module, example: torch.Tensor | None = None):
        """torch.export with the batch dimension dynamic up to export.max_batch."""
        x = self.example if example is None else example
        batch = torch.export.Dim("batch", min=1, max=self.cfg.export.max_batch)
        with progress.phase(log, "tracing the model with torch.export"):
            return torch.export.export(module, (x,), dynamic_shapes=({0: batch},))


def _aoti_package(ep, dst: Path) -> None:
    # freezing folds weights into constants (what makes int8 weight prepacking possible) and
    # must run under no_grad; the configs dict is mutated by the call, hence a fresh one.
    with torch.no_grad(), progress.phase(log, "compiling the AOTInductor package (C++)"):
        torch._inductor.aoti_compile_and_package(ep, package_path=str(dst),
                                                 inductor_configs={"freezing": True})


# --- CPU variants --------------------------------------------------------------------------------


def build_cpu_bf16(ctx: BuildContext, dst: Path) -> None:
    ctx.notes["native_bf16"] = cpu_has_native_bf16()
    ep = ctx.export(CastIO(ctx.model, torch.bfloat16))
    torch.export.save(ep, str(dst))


def build_inductor(dtype: torch.dtype) -> Callable[[BuildContext, Path], None]:
    def build(ctx: BuildContext, dst: Path) -> None:
        module = ctx.model if dtype == torch.float32 else CastIO(ctx.model, dtype)
        if dtype == torch.bfloat16:
            ctx.notes["native_bf16"] = cpu_has_native_bf16()
        _aoti_package(ctx.export(module), dst)

    return build


def build_int8(ctx: BuildContext, dst: Path) -> None:
    """torchao PT2E static quantization (X86InductorQuantizer), compiled by Inductor ahead of time.

    The int8 graph goes through the same Inductor compiler as `torch.compile`, but as an
    AOTInductor package: a `torch.compile`d module cannot be saved, a package reloads in a fresh
    process without torchao. torchao's quantizer module must be imported in the compiling
    process (it registers the int8 fusion passes); without it, or without no_grad + freezing,
    the package silently runs fp32 convolutions (pytorch/ao#4566), hence the check below.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(ctx.export(ctx.model).module(), quantizer)
    seen = 0
    with torch.no_grad():
        for batch in ctx.calibration():
            prepared(batch)
            seen += len(batch)
    ctx.notes["calibration_images"] = seen
    converted = convert_pt2e(prepared)
    _aoti_package(ctx.export(converted), dst)
    kernels = count_int8_kernels(dst)
    ctx.notes["int8_kernels"] = kernels
    if kernels == 0:
        raise BuildFailed("the AOTInductor package has no int8 (qconv/qlinear) kernel: Inductor "
                          "fell back to fp32 (pytorch/ao#4566)")


def count_int8_kernels(package: Path) -> int:
    """How many oneDNN int8 convolution/linear calls the package's generated C++ makes."""
    with zipfile.ZipFile(package) as z:
        sources = [z.read(n).decode(errors="replace") for n in z.namelist()
                   if n.endswith("wrapper.cpp")]
    return sum(s.count("_qconv") + s.count("_qlinear") for s in sources)


def build_ort_fp32(ctx: BuildContext, dst: Path) -> None:
    # The export stage's ONNX file, verified there against eager; ORT optimises it at load.
    shutil.copyfile(ctx.exported / EXPORT_FILES["onnx"], dst)


def build_ort_int8(ctx: BuildContext, dst: Path) -> None:
    """Static QDQ quantization: int8 weights per channel, uint8 activations (U8S8).

    U8S8 is what ORT's x86 kernels are fastest at on VNNI CPUs (about 2x S8S8: figures in
    benchmarks/results/design_figures.md); on x86 without VNNI it can saturate, hence the note
    in the record.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[torch.Tensor]):
            self.batches, self.seen = batches, 0

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.seen += len(batch)
            return {"images": batch.numpy()}

    pre = dst.with_name("pre.onnx")
    quant_pre_process(str(ctx.exported / EXPORT_FILES["onnx"]), str(pre))
    reader = Reader(ctx.calibration())
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    ctx.notes["calibration_images"] = reader.seen
    ctx.notes["vnni"] = bool({"avx512_vnni", "avx_vnni"} & cpu_flags())
    proto = onnx.load(str(dst))
    onnx.helper.set_model_props(proto, {META: json.dumps(ctx.meta, sort_keys=True)})
    onnx.save(proto, str(dst))


def openvino_ir(ctx: BuildContext) -> Any:
    """The export stage's ONNX file as an OpenVINO model: batch dynamic, meta.json in rt_info."""
    import openvino as ov

    model = ov.convert_model(str(ctx.exported / EXPORT_FILES["onnx"]))
    size = ctx.meta["input_size"]
    model.reshape([-1, 3, size, size])  # dynamic batch, whatever the ONNX file says
    model.set_rt_info(json.dumps(ctx.meta, sort_keys=True), list(OPENVINO_META))
    return model


def save_openvino(ctx: BuildContext, model: Any, dst: Path, precision: str) -> None:
    """Save the IR (fp32 weights: OpenVINO would store them fp16 by default) and record what the
    CPU plugin reports once it is compiled the way every consumer compiles it."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    ov.save_model(model, str(dst), compress_to_fp16=False)
    with progress.phase(log, f"compiling the OpenVINO IR ({precision}) for the CPU plugin"):
        compiled, _ = openvino_compile(dst, precision)
    ctx.notes["openvino_version"] = ov.__version__
    ctx.notes["performance_hint"] = str(compiled.get_property(hints.performance_mode))
    ctx.notes["streams"] = int(compiled.get_property(props.num_streams))
    ctx.notes["threads"] = int(compiled.get_property(props.inference_num_threads))
    ctx.notes["inference_precision"] = compiled.get_property(hints.inference_precision).to_string()
    # layers the CPU plugin runs in int8 (the execution graph's runtimePrecision): > 0 only for
    # a quantized IR, so an int8 variant that silently ran float shows 0
    ctx.notes["int8_layers"] = sum(
        op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8")
        for op in compiled.get_runtime_model().get_ordered_ops())
    asked = OPENVINO_PRECISIONS[precision]
    if ctx.notes["inference_precision"] != asked:
        raise BuildFailed(f"OpenVINO was asked for {asked} and compiled "
                          f"{ctx.notes['inference_precision']}")


def build_openvino(precision: str) -> Callable[[BuildContext, Path], None]:
    def build(ctx: BuildContext, dst: Path) -> None:
        if precision == "bf16":
            ctx.notes["native_bf16"] = cpu_has_native_bf16()
        save_openvino(ctx, openvino_ir(ctx), dst, precision)

    return build


# Every setting tried kept top-1 and agreement with fp32 on the real photos; the choice is the
# smallest logit error against fp32, which full bias correction gave at about the same build time
# (figures: benchmarks/results/design_figures.md). Fast and full bias correction differ, presets
# MIXED and PERFORMANCE do not here: the activations are ReLU6, never negative.
# model_type=TRANSFORMER is for transformer blocks (it keeps their softmax/layer norms in float)
# and is not used on these CNNs.
OPENVINO_INT8_SETTINGS: dict[str, Any] = {"preset": "performance", "fast_bias_correction": False}


def build_openvino_int8(ctx: BuildContext, dst: Path) -> None:
    """NNCF post-training quantization of the IR, calibrated on the training images.

    The settings (OPENVINO_INT8_SETTINGS, chosen where it is defined) are NNCF's defaults
    but for the full bias correction; the record keeps the calibration images and int8 layers.
    """
    import nncf

    settings = {**OPENVINO_INT8_SETTINGS,
                "preset": nncf.QuantizationPreset(OPENVINO_INT8_SETTINGS["preset"])}

    batches = [b.numpy() for b in ctx.calibration()]
    ctx.notes["calibration_images"] = sum(len(b) for b in batches)
    # one dataset item is one model input (a batch), hence subset_size counts batches. NNCF
    # draws its own progress bars (rich), so no clock of ours beside them.
    log.info("NNCF: collecting statistics on %d batches and correcting biases", len(batches))
    quantized = nncf.quantize(openvino_ir(ctx), nncf.Dataset(batches),
                              subset_size=len(batches), **settings)
    ctx.notes["nncf_version"] = nncf.__version__
    save_openvino(ctx, quantized, dst, "int8")
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: NNCF inserted no quantizer")


def _needs_native_bf16() -> str | None:
    # OpenVINO does not emulate bf16: without AVX512-BF16 or AMX its CPU plugin compiles f32
    # whatever the hint says, so the variant would be fp32 under a bf16 name (unlike cpu_bf16
    # and inductor_bf16, which really run, emulated, and record native_bf16: false).
    return None if cpu_has_native_bf16() else ("no native bf16 on this CPU (AVX512-BF16 or "
                                               "AMX): OpenVINO would compile f32")


# --- CUDA variants ---------------------------------------------------------------------------


def build_cuda_fp16(ctx: BuildContext, dst: Path) -> None:
    half = copy.deepcopy(ctx.model).to("cuda", torch.float16)
    torch.export.save(ctx.export(half, ctx.example.to("cuda", torch.float16)), str(dst))


def build_inductor_fp16_cuda(ctx: BuildContext, dst: Path) -> None:
    """AOTInductor on CUDA in half precision (Triton kernels), fp32 in and out; no TensorRT.

    CUDA graphs are a `torch.compile` runtime feature (`triton.cudagraphs`), not one of an
    AOTInductor package, so this variant runs without them; max-autotune is off (minutes of
    build per shape). Never run here: no GPU on the machines this was written on.
    """
    module = CastIO(ctx.model, torch.float16).to("cuda")
    ep = ctx.export(module, ctx.example.to("cuda"))
    _aoti_package(ep, dst)
    ctx.notes.update({"cuda_graphs": False, "max_autotune": False})


def trt_compile_settings(precision: str, input_size: int, trt: DictConfig | dict,
                         max_export_batch: int) -> dict:
    """Everything `torch_tensorrt.dynamo.compile` is called with, as plain data (testable here).

    FP16 is built by casting the model and its inputs to half (explicit typing). Since
    Torch-TensorRT 2.13 the dynamo path ignores `enabled_precisions={torch.half}` without a
    word and builds FP32, so it is never passed; the build then checks the engine's layers
    (`oipipe.deploy.trt_layers`) and the output dtype.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"unknown TensorRT precision {precision!r}; expected 'fp32' or 'fp16'")
    lo, opt, hi = int(trt["min_batch"]), int(trt["opt_batch"]), int(trt["max_batch"])
    if not 1 <= lo <= opt <= hi <= max_export_batch:
        raise ConfigError(f"optimize.trt batch range needs 1 <= min_batch ({lo}) <= opt_batch "
                          f"({opt}) <= max_batch ({hi}) <= export.max_batch ({max_export_batch})")
    shape = (3, input_size, input_size)
    return {
        "dtype": torch.float16 if precision == "fp16" else torch.float32,
        "input": {"min_shape": (lo, *shape), "opt_shape": (opt, *shape), "max_shape": (hi, *shape)},
        # The engine's optimisation profile follows the exported program's example, not
        # Input.opt_shape: export from opt_batch real images (evaluation.fill).
        "export_batch": opt,
        "kwargs": {"min_block_size": int(trt["min_block_size"]),
                   "use_fp32_acc": precision == "fp16" and bool(trt["fp32_accumulation"]),
                   # fp32 means fp32: TensorRT runs matmuls and convolutions in TF32 on Ampere
                   # and later unless told not to (disable_tf32 defaults to False)
                   "disable_tf32": precision == "fp32",
                   # everything in TensorRT, or the build fails: a graph left partly in PyTorch
                   # would still return the cast dtype and pass the output-dtype check
                   "require_full_compilation": True},
        "also_torchscript": bool(trt["also_torchscript"]),
    }



def build_trt(precision: str) -> Callable[[BuildContext, Path], None]:
    def build(ctx: BuildContext, dst: Path) -> None:
        import tempfile

        import torch_tensorrt

        s = trt_compile_settings(precision, ctx.meta["input_size"], ctx.cfg.optimize.trt,
                                 ctx.cfg.export.max_batch)
        dtype = s["dtype"]
        model = copy.deepcopy(ctx.model).to("cuda", dtype)
        example = evaluation.fill(ctx.example, s["export_batch"]).to("cuda", dtype)
        ep = ctx.export(model, example)
        spec = [torch_tensorrt.Input(**s["input"], dtype=dtype)]
        # The output dtype cannot tell FP16 from FP32 under strong typing; the engine's layers
        # can. Their details exist only at ProfilingVerbosity.DETAILED, which Torch-TensorRT sets
        # only inside its Debugger; save_layer_info writes them to engine_layer_info.json there
        # (Torch-TensorRT 2.9 to 2.14, see oipipe/deploy/trt_layers.py). The Debugger replaces the
        # root
        # logger's handlers on entry and on exit (logging.config.dictConfig); the stage's are
        # put back after it.
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        with tempfile.TemporaryDirectory(prefix="trt_layers_") as logs:
            try:
                with progress.phase(log, "building the TensorRT engine"), \
                        torch_tensorrt.dynamo.Debugger(log_level="info", logging_dir=logs,
                                                       save_layer_info=True,
                                                       engine_builder_monitor=False):
                    trt_gm = torch_tensorrt.dynamo.compile(ep, arg_inputs=spec, **s["kwargs"])
            finally:
                root.handlers[:] = handlers
                root.setLevel(level)
            # require_full_compilation already makes the compile raise rather than leave a piece
            # to PyTorch; one engine, too, because the layer file holds the last engine built
            engines = trt_layers.tensorrt_submodules(trt_gm)
            fallback = trt_layers.torch_fallback_submodules(trt_gm)
            if fallback or len(engines) != 1:
                raise BuildFailed(f"TensorRT was to run the whole model as one engine; "
                                  f"Torch-TensorRT built {engines} and left {fallback} to PyTorch")
            info = trt_layers.layer_info_file(logs).read_text(encoding="utf-8")
        counts = trt_layers.layer_precisions(info)  # recorded even if the check below fails
        ctx.notes["trt_layers"] = counts["layers"]
        ctx.notes["trt_convolutions"] = counts["convolutions"]
        if precision == "fp16":
            try:
                trt_layers.check_fp16(info)
            except trt_layers.LayerPrecisionError as e:
                raise BuildFailed(str(e)) from e
        with torch.no_grad():
            out = trt_gm(example)
        ctx.notes["output_dtype"] = str(out.dtype)
        if out.dtype != dtype:
            raise BuildFailed(f"TensorRT was asked for {precision} and returned {out.dtype}")
        # The ExportedProgram is what the pipeline loads (torch.export.load after importing
        # torch_tensorrt); TorchScript, when asked for, is written beside it for deployments
        torch_tensorrt.save(trt_gm, str(dst), output_format="exported_program", arg_inputs=spec)
        if s["also_torchscript"]:  # traced with torch.jit.trace: real tensors, not Input specs
            torch_tensorrt.save(trt_gm, str(dst.with_suffix(".ts")), output_format="torchscript",
                                arg_inputs=[example])

    return build


# --- the registry ---------------------------------------------------------------------------


def _needs_cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _needs_trt() -> str | None:
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch_tensorrt not installed (pip install '.[trt]' on a machine with CUDA)"
    return _needs_cuda()


@dataclass(frozen=True)
class Variant:
    """A variant as this stage sees it: what it is and how it loads
    (`oipipe.deploy.runtime.VARIANTS`,
    shared with every consumer), how it is built, and why it cannot be built here."""

    name: str
    spec: VariantSpec
    build: Callable[[BuildContext, Path], None]
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here, or None

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def file(self) -> str:
        return self.spec.file

    def load(self, artifact: Path) -> Runtime:
        return self.spec.load(artifact)


BUILDERS: dict[str, tuple[Callable[[BuildContext, Path], None], Callable[[], str | None]]] = {
    "cpu_bf16": (build_cpu_bf16, lambda: None),
    "inductor_fp32": (build_inductor(torch.float32), lambda: None),
    "inductor_bf16": (build_inductor(torch.bfloat16), lambda: None),
    "int8": (build_int8, lambda: None),
    "onnxruntime_fp32": (build_ort_fp32, lambda: None),
    "onnxruntime_int8": (build_ort_int8, lambda: None),
    "openvino_fp32": (build_openvino("fp32"), lambda: None),
    "openvino_bf16": (build_openvino("bf16"), _needs_native_bf16),
    "openvino_int8": (build_openvino_int8, lambda: None),
    "cuda_fp16": (build_cuda_fp16, _needs_cuda),
    "inductor_fp16_cuda": (build_inductor_fp16_cuda, _needs_cuda),
    "trt_fp32": (build_trt("fp32"), _needs_trt),
    "trt_fp16": (build_trt("fp16"), _needs_trt),
}
if set(BUILDERS) != set(OPTIMIZE_VARIANTS):  # the registry names them, each is built here
    raise ImportError(f"optimize.BUILDERS {sorted(BUILDERS)} differs from the registry "
                      f"oipipe.core.variants {sorted(OPTIMIZE_VARIANTS)}")
VARIANTS: dict[str, Variant] = {
    name: Variant(name, SPECS[name], *BUILDERS[name]) for name in OPTIMIZE_VARIANTS}


def get_variant(name: str) -> Variant:
    variant_spec(name)  # the error listing the valid names
    return VARIANTS[name]


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: DictConfig, variant_name: str) -> dict:
    """Build one variant, load it back, measure its accuracy against fp32 on the held-out images
    (`optimize.eval_splits`, by default val + test), record it with its verdict."""
    variant = get_variant(variant_name)
    folder = path(cfg, "optimized") / variant.name
    metrics_file = path(cfg, "metrics") / "optimize" / f"{variant.name}.json"
    record: dict[str, Any] = {"variant": variant.name, "backend": variant.backend,
                              "precision": variant.precision, "status": "skipped",
                              "reason": None, "error": None, "artifact": None, "size_mb": None,
                              "build_seconds": None}
    # Inputs are checked before any work: these are the user's errors, not the variant's.
    model, meta = models.load_trained(path(cfg, "checkpoint"))
    exported = path(cfg, "exported")
    if not (exported / EXPORT_FILES["onnx"]).is_file() and variant.backend in ("onnxruntime",
                                                                                "openvino"):
        raise InputError(f"{exported / EXPORT_FILES['onnx']} not found: run the export stage "
                         "with 'onnx' in export.formats")
    prepared, splits = path(cfg, "prepared"), list(cfg.optimize.eval_splits)
    images, labels = evaluation.images(prepared, splits, meta)
    batches = evaluation.batches(images, cfg.optimize.eval_batch)
    calibration: Callable[[], Iterator[torch.Tensor]] = lambda: iter(())  # noqa: E731
    if variant.precision == "int8":
        calibration = _counted_calibration(cfg, prepared, meta, variant.name)

    with stage_run(cfg, "optimize") as tracker, atomic_dir(folder) as tmp:
        tracker.log_params({f"optimize.{variant.name}.backend": variant.backend,
                            f"optimize.{variant.name}.precision": variant.precision})
        reason = variant.unavailable()
        if reason:
            record["reason"] = reason
            log.warning("%s skipped: %s", variant.name, reason)
        else:
            # batch 2 (1 would be specialised); cloned, or the saved program keeps the whole
            # batch the view points into (18 MB at 30 images of 224 px)
            first = batches[0] if len(batches[0]) > 1 else torch.cat([batches[0]] * 2)
            ctx = BuildContext(cfg, model, meta, first[:2].clone(), calibration, exported)
            record.update(_build_and_check(cfg, variant, ctx, tmp, batches, labels))
            record.update(ctx.notes)
        write_json(tmp / META, meta)
        write_json(tmp / RECORD, record)
        write_json(metrics_file, record)
        # top1 and agreement are percentages already, as everywhere in MLflow
        tracker.log_metrics({variant.name: {
            **{k: v for k, v in record.items() if k not in ("error", "reason")},
            "verdict_code": verdict_code(record.get("verdict"))}})
        tracker.set_tags({f"optimize.{variant.name}.status": record["status"],
                          **({f"optimize.{variant.name}.verdict": record["verdict"]}
                             if record.get("verdict") else {})})
    return record


def _counted_calibration(cfg: DictConfig, prepared: Path, meta: dict,
                         name: str) -> Callable[[], Iterator[torch.Tensor]]:
    """The calibration batches, counted on a bar as the quantizer pulls them."""
    opt = cfg.optimize
    batches = evaluation.calibration_batches(prepared, meta, opt.calibration_images,
                                             opt.calibration_batch)
    images = min(opt.calibration_images, len(PreparedImages(prepared, "train")))
    total = -(-images // opt.calibration_batch)
    return lambda: progress.counted(batches(), total, f"{name} calibration")


def artifact_bytes(artifact: Path) -> int:
    """The artifact's size on disk; an OpenVINO IR's weights are in the .bin beside its .xml."""
    weights = artifact.with_suffix(".bin")
    extra = weights.stat().st_size if artifact.suffix == ".xml" and weights.is_file() else 0
    return artifact.stat().st_size + extra


def _build_and_check(cfg: DictConfig, variant: Variant, ctx: BuildContext, tmp: Path,
                     batches: list[torch.Tensor], labels: np.ndarray) -> dict:
    artifact = tmp / variant.file
    # relative to paths.root: records are DVC metrics and must not depend on the checkout path
    final = Path(cfg.paths.optimized) / variant.name / variant.file
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        variant.build(ctx, artifact)
        out["build_seconds"] = round(time.perf_counter() - t0, 3)
        out["artifact"] = str(final)
        out["size_mb"] = round(artifact_bytes(artifact) / 2**20, 3)
        runtime = variant.load(artifact)  # from disk, as the benchmark will
        outs = []
        with progress.steps(len(batches), f"{variant.name} evaluation", "batch") as bar:
            for x in batches:
                outs.append(runtime(x))
                bar.update(1)
        got = np.concatenate(outs)
    except Exception as e:  # noqa: BLE001 - any build error is this variant's recorded result
        log.error("%s failed:\n%s", variant.name, traceback.format_exc())
        for leftover in tmp.iterdir():  # no half-built artifact beside a `failed` record
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip()[:2000]}",
                "artifact": None, "size_mb": None}
    with torch.no_grad():
        fp32 = np.concatenate([ctx.model(x).numpy() for x in batches])
    acc = evaluation.against_fp32(fp32, got, labels, cfg.optimize.accuracy_bars[variant.precision])
    log.info("%s: %.1f MB, built in %.1f s, top-1 %.1f%% [%.1f, %.1f] (fp32 %.1f%%) on %d "
             "images of %s, agreement %.1f%%: %s, %s", variant.name, out["size_mb"],
             out["build_seconds"], acc["top1_pct"], acc["top1_ci_low_pct"], acc["top1_ci_high_pct"],
             acc["fp32_top1_pct"], acc["eval_images"], "+".join(cfg.optimize.eval_splits),
             acc["agreement_pct"], acc["verdict"].upper(), acc["verdict_reason"])
    return {"status": "ok", **out, "eval_splits": list(cfg.optimize.eval_splits), **acc}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser("optimize", "Build one optimized variant of the trained model, "
                              "load it back and measure its accuracy against fp32 (DVC runs one "
                              "per entry of optimize.variants).")
    # No argparse `choices`: run() names an unknown variant with "did you mean", exit code 2.
    parser.add_argument("--variant", required=True, metavar="VARIANT",
                        help="the variant to build, one of: " + ", ".join(
                            f"{v.name} ({v.backend} {v.precision})" for v in VARIANTS.values()))
    args = parser.parse_intermixed_args(argv)
    sys.exit(cli.run_stage("optimize", lambda cfg: run(cfg, args.variant), args=args))


if __name__ == "__main__":
    main()
