"""What a Torch-TensorRT engine runs, layer by layer: its precisions, read from TensorRT's own
engine inspector, and whether any of the graph was left to PyTorch.

The output dtype of a compiled model cannot tell an FP16 engine from an FP32 one under strong
typing (the cast model returns half either way), so the optimize stage's TensorRT build reads the
engine's layer information instead. Nothing here imports torch_tensorrt or tensorrt: it parses
text, tested on saved samples (tests/data/trt_layer_info_*.json).

Sources read (pytorch/TensorRT, branch main at version 2.14.0a0, commit d7f2062; the same code at
tags v2.9.0 to v2.13.0):

- py/torch_tensorrt/dynamo/debug/_Debugger.py: `torch_tensorrt.dynamo.Debugger(log_level="debug",
  capture_fx_graph_before=None, capture_fx_graph_after=None, save_engine_profile=False,
  profile_format="perfetto", engine_builder_monitor=True, logging_dir=DEBUG_LOGGING_DIR,
  save_layer_info=False)`, a context manager (its `__enter__` returns None).
- py/torch_tensorrt/dynamo/conversion/_TRTInterpreter.py: the builder's ProfilingVerbosity is
  DETAILED only while a Debugger is active, LAYER_NAMES_ONLY otherwise.
- py/torch_tensorrt/dynamo/_compiler.py, `compile_module`: with `save_layer_info`, after each
  TensorRT engine is built it writes `trt_module.get_layer_info()` to
  `<logging_dir>/engine_layer_info.json`, one fixed name: a second engine overwrites the first.
- core/runtime/TRTEngine.cpp `get_engine_layer_info` (and runtime/_TRTEngine.py): TensorRT's
  `IEngineInspector::getEngineInformation(LayerInformationFormat::kJSON)`, with no execution
  context set.
- partitioning/_adjacency_partitioner.py and _global_partitioner.py: engines are the submodules
  `_run_on_acc_<n>`; graph pieces left to PyTorch are `_run_on_gpu_<n>` (adjacency, the default
  fast partitioner; the global one leaves them inline in the top graph). Both raise when
  `require_full_compilation=True` and the model is not fully supported.

The JSON is `{"Layers": [...], "Bindings": ["x", "output0"]}`. At DETAILED verbosity a layer is an
object: "Name", "LayerType" (CaskConvolution, CudaDepthwiseConvolution, CaskPooling, Reformat,
NoOp, kgen, ...), "Inputs"/"Outputs" as lists of {"Name", "Location", "Dimensions",
"Format/Datatype"}, "ParameterType" ("Convolution", "Pooling", ...), "Weights": {"Type": "Half",
"Count": 9408}, "TacticName", "TacticValue" (real TensorRT 8 samples: NVIDIA/TensorRT,
tools/experimental/trt-engine-explorer/examples/pytorch/resnet/A100/{fp16,fp32}/
resnet.onnx.engine.graph.json; trex's parser.py rejects the names-only form the same way). At
LAYER_NAMES_ONLY a layer is only its name, a string (NVIDIA/TensorRT issue #4020). Without an
execution context, an engine with dynamic shapes (ours: a dynamic batch) reports Dimensions of -1
and no format: "N/A due to dynamic shapes" (TensorRT's IEngineInspector::setExecutionContext
documentation). A layer's weights type is reported regardless, so a convolution's precision is
read from its "Weights" first.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

LAYER_INFO_FILE = "engine_layer_info.json"  # the name _compiler.py writes under logging_dir
ENGINE_PREFIX = "_run_on_acc_"  # a TensorRT engine submodule of the compiled GraphModule
FALLBACK_PREFIX = "_run_on_gpu_"  # a piece of the graph Torch-TensorRT left to PyTorch
UNKNOWN = "unknown"

# Words that name a datatype in "Format/Datatype" strings, in TensorRT 8's long descriptions
# ("Channel major FP16 format where channel % 8 == 0", "Row major linear FP32") and in the short
# names of TensorRT 10 kgen layers and weights ("Half", "Float", "Int32"; NVIDIA/TensorRT #4397).
_DTYPE_WORDS = {
    "half": "fp16",
    "fp16": "fp16",
    "float": "fp32",
    "fp32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "double": "fp64",
    "fp8": "fp8",
    "fp4": "fp4",
    "fp4e2m1": "fp4",
    "int4": "int4",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}


class LayerPrecisionError(RuntimeError):
    """The engine's layers do not run in the precision that was asked for."""


def tensor_dtype(description: str | None) -> str | None:
    """The datatype a "Format/Datatype" (or "Weights" "Type") string names, as "fp16", "fp32",
    "int8", ...; None when it names none ("N/A due to dynamic shapes", "Unknown format")."""
    for word in re.findall(r"[A-Za-z0-9]+", description or ""):
        if word.lower() in _DTYPE_WORDS:
            return _DTYPE_WORDS[word.lower()]
    return None


def parse_layers(info: str | bytes | dict) -> list[dict]:
    """The layer objects of engine-inspector JSON (text or already parsed).

    Raises ValueError when it is not that JSON, or when its layers are names only: the engine was
    built below ProfilingVerbosity.DETAILED, which Torch-TensorRT uses only inside its Debugger.
    """
    data = json.loads(info) if isinstance(info, str | bytes) else info
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError(
            "not TensorRT engine-inspector JSON: expected an object with a non-empty "
            f"'Layers' list, got {type(data).__name__} with keys "
            f"{sorted(data) if isinstance(data, dict) else []}"
        )
    names_only = [x for x in layers if not isinstance(x, dict)]
    if names_only:
        raise ValueError(
            f"the engine's layer information holds only layer names ({len(names_only)} of "
            f"{len(layers)} layers, e.g. {str(names_only[0])[:80]!r}): it was built at "
            "ProfilingVerbosity LAYER_NAMES_ONLY. Layer details need ProfilingVerbosity.DETAILED, "
            "which Torch-TensorRT sets only inside torch_tensorrt.dynamo.Debugger(...): compile "
            "inside Debugger(save_layer_info=True, logging_dir=...)"
        )
    return layers


def is_convolution(layer: dict) -> bool:
    """A convolution of any kind: ParameterType "Convolution" (also a deconvolution, and a fully
    connected layer TensorRT runs as a 1x1 convolution), or "Conv" in the LayerType
    (CaskConvolution, CudaDepthwiseConvolution, FusedConvActConvolution, ConvActPool, ...)."""
    return (
        layer.get("ParameterType") == "Convolution"
        or "conv" in str(layer.get("LayerType", "")).lower()
    )


def _weights_dtype(layer: dict) -> str | None:
    weights = layer.get("Weights")
    return tensor_dtype(weights.get("Type")) if isinstance(weights, dict) else None


def _tensor_description(tensor: Any) -> str | None:
    # "Format/Datatype" in every sample read; "Datatype" as a separate key is also accepted,
    # as NVIDIA's newer layer-info tooling (TensorRT main, .agents/skills/trt-perf-analysis) does
    if not isinstance(tensor, dict):
        return None
    return tensor.get("Format/Datatype") or tensor.get("Datatype")


def layer_dtype(layer: dict) -> str:
    """The datatype of a layer's first output whose format is known, else of its weights, else
    "unknown" (an engine with dynamic shapes shows no formats)."""
    for tensor in layer.get("Outputs") or []:
        dtype = tensor_dtype(_tensor_description(tensor))
        if dtype:
            return dtype
    return _weights_dtype(layer) or UNKNOWN


def conv_dtype(layer: dict) -> str:
    """A convolution's arithmetic type: its weights' type (TensorRT reports it with or without
    dynamic shapes; Torch-TensorRT's convolution converter casts the kernel to the input's
    dtype), else its output's."""
    return _weights_dtype(layer) or layer_dtype(layer)


def layer_precisions(info: str | bytes | dict) -> dict[str, dict[str, int]]:
    """Per-datatype counts of the engine's layers (by output datatype, see `layer_dtype`) and of
    its convolutions (see `conv_dtype`), e.g. {"layers": {"fp16": 5, "unknown": 5},
    "convolutions": {"fp16": 5}}."""
    layers = parse_layers(info)
    return {
        "layers": dict(sorted(Counter(layer_dtype(x) for x in layers).items())),
        "convolutions": dict(
            sorted(Counter(conv_dtype(x) for x in layers if is_convolution(x)).items())
        ),
    }


def check_fp16(info: str | bytes | dict) -> None:
    """Raise LayerPrecisionError unless the engine runs its convolutions in half precision: none
    in another datatype (fp32, which TF32 kernels also show as, bf16, int8) and at least one seen
    in fp16. A convolution that shows no type at all is left out (counted as "unknown")."""
    layers = parse_layers(info)
    convs = [(str(x.get("Name", "?")), conv_dtype(x)) for x in layers if is_convolution(x)]
    if not convs:
        types = sorted({str(x.get("LayerType", "?")) for x in layers})
        raise LayerPrecisionError(
            f"fp16 was asked for, but the engine has no convolution layer to show it ({len(layers)}"
            f" layers of types {types}): its precision cannot be confirmed"
        )
    dtypes = dict(sorted(Counter(dtype for _, dtype in convs).items()))
    other = [(name, dtype) for name, dtype in convs if dtype not in ("fp16", UNKNOWN)]
    if other:
        examples = "; ".join(f"{name[:120]} ({dtype})" for name, dtype in other[:3])
        raise LayerPrecisionError(
            f"fp16 was asked for, but TensorRT runs {len(other)} of {len(convs)} convolution "
            f"layers in another precision (convolutions by datatype: {dtypes}), e.g. {examples}. "
            "Cast the model and its inputs to half before export (strong typing builds what the "
            "graph says)"
        )
    if "fp16" not in dtypes:
        raise LayerPrecisionError(
            f"fp16 was asked for, but none of the engine's {len(convs)} convolution layers shows "
            "its datatype (neither weights nor formats): its precision cannot be confirmed"
        )


def layer_info_file(logging_dir: str | Path) -> Path:
    """The layer information Torch-TensorRT's Debugger wrote in `logging_dir`."""
    found = Path(logging_dir) / LAYER_INFO_FILE
    if not found.is_file():
        raise FileNotFoundError(
            f"{found} not found: Torch-TensorRT (2.9 or later) writes it only for a compile run "
            "inside torch_tensorrt.dynamo.Debugger(save_layer_info=True, logging_dir=...), once "
            "per TensorRT engine it builds"
        )
    return found


def tensorrt_submodules(gm: Any) -> list[str]:
    """Names of the TensorRT engine submodules of a Torch-TensorRT compiled GraphModule."""
    return [name for name, _ in gm.named_children() if name.startswith(ENGINE_PREFIX)]


def torch_fallback_submodules(gm: Any) -> list[str]:
    """Names of the submodules of a Torch-TensorRT compiled GraphModule that run in PyTorch."""
    return [name for name, _ in gm.named_children() if name.startswith(FALLBACK_PREFIX)]
