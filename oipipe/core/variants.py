"""One row per optimized variant and one per export format: the tables every consumer reads.

Torch-free (validating a config imports no compiler): loaders and builders are import strings,
`"module:function"`, imported only when a variant is loaded or built (`imported`).

- Config validation takes the allowed names from here (`VariantName`, `ExportFormatName`), DVC's
  `optimize@<name>` stages are `optimize.variants` (conf/optimize), the optimize stage builds a
  row with its `builder`, and the benchmark, the stream client and `load_artifact` load it with
  its `loader` (`oipipe.deploy.runtime.load_variant`).
- What a variant `requires` is data, checked in one place (`oipipe.deploy.build.missing`):
  `cuda`, `torch_tensorrt`, `native_bf16` (AVX512-BF16 or AMX), `bf16_not_emulated` (the same,
  waived by `optimize.allow_emulated=true`), `package:<module>`. A row whose requirement is
  missing records `skipped` with the reason instead of failing.
- Its quantizer and compiler settings live in conf/optimize (`optimize.settings.<name>`, and
  `optimize.trt` for the two TensorRT rows), so a sweep can change them.

Adding a variant is its row here, its build function (oipipe/deploy/build_<backend>.py) and, when
it has settings, its block in conf/optimize with its type in `oipipe.core.schema`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

RT = "oipipe.deploy.runtime:"


@dataclass(frozen=True)
class Variant:
    backend: str  # torch_eager | aot_inductor | onnxruntime | openvino | torch_tensorrt
    precision: str  # fp32 | bf16 | fp16 | int8: which accuracy bar it is judged by
    device: str  # cpu | cuda
    file: str  # the artifact's file name in paths.optimized/<name>/
    builder: str  # "module:function", called as (BuildContext, artifact path)
    loader: str  # "module:function", called as (artifact path, **loader_args) -> Runtime
    loader_args: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    settings: str | None = None  # whose block of optimize.settings it builds with (None: its own)
    # a compression of another row (the same engine, uncompressed: the report's compression
    # table measures it against that `twin`) and what the compression is, in words
    twin: str | None = None
    compression: str | None = None


def _openvino(
    precision: str,
    builder: str,
    *requires: str,
    settings: str | None = None,
    module: str = "build_openvino",
    compression: str | None = None,
) -> Variant:
    """An OpenVINO IR row: compiled by its loader in the row's own precision; built by
    `oipipe.deploy.<module>:<builder>`."""
    return Variant(
        "openvino",
        precision,
        "cpu",
        "model.xml",
        f"oipipe.deploy.{module}:{builder}",
        RT + "openvino_runtime",
        {"precision": precision},
        requires=("package:openvino", *requires),
        settings=settings,
        twin="openvino_fp32" if compression else None,
        compression=compression,
    )


def _tensorrt(precision: str) -> Variant:
    """A Torch-TensorRT row: the engine built and loaded in the row's own precision."""
    return Variant(
        "torch_tensorrt",
        precision,
        "cuda",
        "model.ep",
        "oipipe.deploy.build_tensorrt:engine",
        RT + "trt_runtime",
        {"dtype": {"fp32": "float32", "fp16": "float16"}[precision]},
        requires=("torch_tensorrt", "cuda"),
    )


VARIANTS: dict[str, Variant] = {
    # what a PyTorch user gets without a compiler: the eager model cast to bf16, exported
    "eager_bf16": Variant(
        "torch_eager",
        "bf16",
        "cpu",
        "model.pt2",
        "oipipe.deploy.build_torch:eager_bf16",
        RT + "program_runtime",
        requires=("bf16_not_emulated",),
    ),
    "inductor_fp32": Variant(
        "aot_inductor",
        "fp32",
        "cpu",
        "model.pt2",
        "oipipe.deploy.build_torch:inductor",
        RT + "aoti_runtime",
    ),
    "inductor_bf16": Variant(
        "aot_inductor",
        "bf16",
        "cpu",
        "model.pt2",
        "oipipe.deploy.build_torch:inductor",
        RT + "aoti_runtime",
        requires=("bf16_not_emulated",),
    ),
    "inductor_int8": Variant(
        "aot_inductor",
        "int8",
        "cpu",
        "model.pt2",
        "oipipe.deploy.build_torch:inductor_int8",
        RT + "aoti_runtime",
        requires=("package:torchao",),
        twin="inductor_fp32",
        compression="post-training int8 (PT2E)",
    ),
    "onnxruntime_fp32": Variant(
        "onnxruntime",
        "fp32",
        "cpu",
        "model.onnx",
        "oipipe.deploy.build_ort:exported_onnx",
        RT + "ort_runtime",
        requires=("package:onnxruntime",),
    ),
    "onnxruntime_int8": Variant(
        "onnxruntime",
        "int8",
        "cpu",
        "model.onnx",
        "oipipe.deploy.build_ort:qdq_int8",
        RT + "ort_runtime",
        requires=("package:onnxruntime",),
        twin="onnxruntime_fp32",
        compression="post-training int8 (QDQ)",
    ),
    "openvino_fp32": _openvino("fp32", "ir"),
    # OpenVINO does not emulate bf16: without native bf16 its CPU plugin compiles f32 whatever
    # the hint says, so the row would be fp32 under a bf16 name. eager_bf16 and inductor_bf16 do
    # run emulated, many times slower than fp32: skipped there unless optimize.allow_emulated
    # (`bf16_not_emulated`), and they record native_bf16 when built.
    "openvino_bf16": _openvino("bf16", "ir", "native_bf16"),
    "openvino_int8": _openvino(
        "int8", "nncf_int8", "package:nncf", compression="post-training int8 (NNCF)"
    ),
    # NNCF int8 with an accuracy budget on the validation split (optimize.settings)
    "openvino_ac_int8": _openvino(
        "int8",
        "accuracy_control_int8",
        "package:nncf",
        compression="post-training int8 with an accuracy budget (NNCF)",
    ),
    # OpenVINO running ONNX Runtime's QDQ int8 file (quantized with onnxruntime_int8's
    # settings): on an AVX2-only EPYC it beat the NNCF IR at batch 32 (199 against 171
    # images/s), on an AVX-512 one it lost (1/1.06); the benchmark picks per machine
    "openvino_qdq_int8": _openvino(
        "int8",
        "qdq_int8",
        "package:onnxruntime",
        settings="onnxruntime_int8",
        compression="post-training int8 (ONNX Runtime's QDQ file)",
    ),
    # quantization-aware training from openvino_int8's scheme (oipipe/deploy/build_qat.py)
    "openvino_qat_int8": _openvino(
        "int8",
        "openvino_qat_int8",
        "package:nncf",
        module="build_qat",
        compression="quantization-aware training int8",
    ),
    # channel pruning (optimize.settings.pruned), fine-tuned, then fp32, post-training int8
    # (openvino_int8's settings) or QAT int8 (oipipe/deploy/build_pruned.py)
    "openvino_pruned_fp32": _openvino(
        "fp32",
        "openvino_pruned_fp32",
        "package:torch_pruning",
        module="build_pruned",
        compression="channel pruning",
    ),
    "openvino_pruned_int8": _openvino(
        "int8",
        "openvino_pruned_int8",
        "package:torch_pruning",
        "package:nncf",
        module="build_pruned",
        settings="openvino_int8",
        compression="channel pruning, then post-training int8",
    ),
    "openvino_pruned_qat_int8": _openvino(
        "int8",
        "openvino_pruned_qat_int8",
        "package:torch_pruning",
        "package:nncf",
        module="build_pruned",
        compression="channel pruning, then quantization-aware training int8",
    ),
    "eager_fp16_cuda": Variant(
        "torch_eager",
        "fp16",
        "cuda",
        "model.pt2",
        "oipipe.deploy.build_torch:eager_fp16_cuda",
        RT + "program_runtime",
        {"device": "cuda", "dtype": "float16"},
        requires=("cuda",),
    ),
    # fp32 in and out on the GPU (the cast to half is inside the package)
    "inductor_fp16_cuda": Variant(
        "aot_inductor",
        "fp16",
        "cuda",
        "model.pt2",
        "oipipe.deploy.build_torch:inductor_fp16_cuda",
        RT + "aoti_runtime",
        {"device": "cuda"},
        requires=("cuda",),
    ),
    "trt_fp32": _tensorrt("fp32"),
    "trt_fp16": _tensorrt("fp16"),
}


@dataclass(frozen=True)
class ExportFormat:
    file: str  # in paths.exported; its suffix tells the format of a file handed to a loader
    writer: str  # "module:function", called as (model, example, dst, meta_json, export conf)
    loader: str  # "module:function", called as (file, **loader_args) -> Runtime
    loader_args: Mapping[str, Any] = field(default_factory=dict)


FORMATS: dict[str, ExportFormat] = {
    "torchscript": ExportFormat(
        "model.ts",
        "oipipe.deploy.export_formats:torchscript",
        RT + "torchscript_runtime",
        {"extra_files": ("meta.json",)},
    ),
    "exported_program": ExportFormat(
        "model.pt2",
        "oipipe.deploy.export_formats:exported_program",
        RT + "program_runtime",
        {"extra_files": ("meta.json",)},
    ),
    "onnx": ExportFormat("model.onnx", "oipipe.deploy.export_formats:onnx", RT + "ort_runtime"),
}

if TYPE_CHECKING:  # a Literal built from the tables is a value to mypy; the checker sees str
    VariantName = str
    ExportFormatName = str
else:
    VariantName = Literal[tuple(VARIANTS)]
    ExportFormatName = Literal[tuple(FORMATS)]
OPTIMIZE_VARIANTS: tuple[str, ...] = get_args(VariantName)
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormatName)


def imported(spec: str) -> Any:
    """The object an import string `"package.module:name"` names (imported now, not before)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
