"""How any artifact of the pipeline is run: the export check, the optimize accuracy pass, the
benchmark (and the stream client) all load through here, so they run it the same way.

Which loader runs which artifact is data, in `oipipe.core.variants` (a row per variant and per
export format); the loaders are here, and `load_variant(folder)` / `load_artifact(path)` find
the row and call its loader.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oipipe.core.errors import ConfigError, InputError, error_text
from oipipe.core.variants import FORMATS, VARIANTS, Variant, imported


@dataclass
class Runtime:
    """`call(prepare(x))` is the timed inference; `logits(...)` turns its output into fp32 numpy.

    Kept apart so a benchmark times only `call` (inputs already on the device, in the variant's
    dtype) and `sync` (CUDA work finished), never the host-side conversions. `extra` holds the
    metadata files the artifact carried, by name.
    """

    call: Callable[[Any], Any]
    prepare: Callable[[torch.Tensor], Any]
    logits: Callable[[Any], np.ndarray]
    device: str = "cpu"
    sync: Callable[[], None] = lambda: None
    extra: dict[str, str] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.logits(self.call(self.prepare(x)))


def torch_runtime(
    module: Callable,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    extra: dict[str, str] | None = None,
) -> Runtime:
    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Runtime(
        call=call,
        prepare=lambda x: x.to(device=device, dtype=dtype),
        logits=lambda y: y.float().cpu().numpy(),
        device=device,
        sync=sync,
        extra=extra or {},
    )


def torchscript_runtime(file: Path, extra_files: tuple[str, ...] = ()) -> Runtime:
    extra = dict.fromkeys(extra_files, "")
    module = torch.jit.load(str(file), map_location="cpu", _extra_files=extra)
    return torch_runtime(module, extra=extra)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def program_runtime(
    file: Path,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    extra_files: tuple[str, ...] = (),
) -> Runtime:
    """A `torch.export` program (`.pt2` from torch.export.save, or Torch-TensorRT's `.ep`)."""
    dtype = _dtype(dtype)
    extra = dict.fromkeys(extra_files, "")
    module = torch.export.load(str(file), extra_files=extra).module()
    return torch_runtime(module.to(device) if device != "cpu" else module, device, dtype, extra)


def aoti_runtime(file: Path, device: str = "cpu") -> Runtime:
    return torch_runtime(torch._inductor.aoti_load_package(str(file)), device)


def ort_runtime(file: Path, threads: int = 0) -> Runtime:
    """ONNX Runtime, CUDA provider first where present; `threads` 0: torch's thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(file), so, providers=providers)
    name = session.get_inputs()[0].name
    return Runtime(
        call=lambda x: session.run(None, {name: x})[0],
        prepare=lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32),
        logits=lambda y: np.asarray(y, dtype=np.float32),
        device="cuda" if session.get_providers()[0].startswith("CUDA") else "cpu",
        extra=dict(session.get_modelmeta().custom_metadata_map),
    )


# OpenVINO's names for the pipeline's precisions. int8 is in the IR itself (NNCF's FakeQuantize
# nodes); what is left in floating point runs f32, so int8 is measured alone, not int8 + bf16.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# Where the IR keeps the pipeline's metadata (meta.json, the string the ONNX variants carry).
OPENVINO_META = ("oi_pipeline", "meta.json")


def openvino_compile(
    file: Path, precision: str, threads: int = 0, hint: str = "LATENCY", streams: int = 0
) -> tuple[Any, dict[str, str]]:
    """The IR at `file` compiled for CPU, and the metadata its rt_info carries (by file name,
    as `Runtime.extra`). `precision` one of OPENVINO_PRECISIONS, `threads` 0:
    torch's thread count (the benchmark sets it from benchmark.threads, as for ORT); `hint`
    OpenVINO's performance mode: LATENCY (one stream, what every one-call consumer uses) or
    THROUGHPUT (several streams, for several requests in flight: the benchmark's throughput mode),
    `streams` > 0 overriding the number of streams the hint would choose.

    The precision hint is always set: OpenVINO's CPU default is bf16 wherever the CPU has
    AVX512-BF16 or AMX, so an IR compiled without it is not the fp32 model it looks like.
    """
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(
            f"unknown OpenVINO precision {precision!r}; expected one of "
            f"{sorted(OPENVINO_PRECISIONS)}"
        )
    core = ov.Core()
    model = core.read_model(str(file))
    key = list(OPENVINO_META)
    extra = {key[-1]: model.get_rt_info(key).astype(str)} if model.has_rt_info(key) else {}
    config = {
        hints.inference_precision: OPENVINO_PRECISIONS[precision],
        hints.performance_mode: getattr(hints.PerformanceMode, hint),
        props.inference_num_threads: threads or torch.get_num_threads(),
    }
    if streams:
        config[props.num_streams] = streams
    compiled = core.compile_model(model, "CPU", config)
    return compiled, extra


def openvino_runtime(file: Path, precision: str, threads: int = 0) -> Runtime:
    """OpenVINO on CPU, one synchronous inference per call (see `openvino_compile`)."""
    compiled, extra = openvino_compile(file, precision, threads)
    request = compiled.create_infer_request()
    # share_inputs: the prepared array is read in place; outputs are copied (the request's own
    # buffer is overwritten by the next call)
    return Runtime(
        call=lambda x: request.infer({0: x}, share_inputs=True)[0],
        prepare=lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32),
        logits=lambda y: np.asarray(y, dtype=np.float32),
        extra=extra,
    )


def eager_runtime(
    model: torch.nn.Module, device: str = "cpu", channels_last: bool | None = None
) -> Runtime:
    """The model as a competent PyTorch user runs it: `inference_mode`, and on CPU the
    channels_last memory format for weights and inputs (PyTorch's own CPU inference advice:
    oneDNN's convolutions are fastest in NHWC; benchmarks/results/design_figures.md)."""
    if channels_last is None:
        channels_last = device == "cpu"
    model = model.to(device)
    if not channels_last:
        return torch_runtime(model, device)
    model = model.to(memory_format=torch.channels_last)
    rt = torch_runtime(model, device)
    base = rt.prepare
    rt.prepare = lambda x: base(x).contiguous(memory_format=torch.channels_last)
    return rt


# --- where artifacts live and how each optimized variant loads ---------------------------------

RECORD, META = "record.json", "meta.json"


def trt_runtime(file: Path, dtype: torch.dtype | str) -> Runtime:
    import torch_tensorrt  # noqa: F401  (registers the TensorRT engine op the program calls)

    return program_runtime(file, "cuda", dtype)


def variant_row(name: str) -> Variant:
    """The variant's row of `oipipe.core.variants.VARIANTS`; an unknown name is a config error."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, VARIANTS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown variant {name!r}; {hint}expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def load_file(row: Variant, artifact: Path) -> Runtime:
    """A variant's artifact file, run by the loader its row names."""
    return imported(row.loader)(artifact, **row.loader_args)


def load_variant(folder: Path) -> tuple[Runtime, dict, dict]:
    """A built variant, loaded alone from its folder: (runtime, metadata, record)."""
    record_file = folder / RECORD
    if not record_file.is_file():
        raise InputError(f"{record_file} not found: run `dvc repro optimize` first")
    record = json.loads(record_file.read_text())
    if record["status"] != "ok":
        raise InputError(
            f"variant {record['variant']} is {record['status']}: "
            f"{record.get('reason') or record.get('error')}"
        )
    meta = json.loads((folder / META).read_text())
    row = variant_row(record["variant"])
    return load_file(row, folder / row.file), meta, record


# --- one way to load any artifact ---------------------------------------------------------------

# The export stage's formats by file suffix (an optimized variant is known by its record instead).
_EXPORT_SUFFIXES = {Path(fmt.file).suffix: name for name, fmt in FORMATS.items()}


def load_artifact(
    target: Path | str, device: str = "cpu", channels_last: bool | None = None
) -> tuple[Runtime, dict]:
    """Any artifact the pipeline writes, loaded the way every consumer runs it: (runtime, meta),
    meta holding the classes and the preprocessing (input_size, crop_pct, mean, std).

    - an optimized variant: its folder (`artifacts/optimized/inductor_int8`) or the file in it; the
      record beside it names the loader (`load_variant`);
    - an exported file (`model.ts`, `model.pt2`, `model.onnx`): the metadata it carries inside;
    - the train stage's checkpoint (`model.pt`): eager, `inference_mode`, channels_last on CPU
      unless `channels_last=False` (the benchmark's baseline); `device` applies to it only.

    Imports only what the artifact needs: an ONNX file loads without torchvision, timm or any
    build code."""
    p = Path(target)
    if not p.exists():
        raise InputError(f"{p} does not exist: name an artifact folder or file of the pipeline")
    folder = p if p.is_dir() else p.parent
    if (folder / RECORD).is_file():
        try:
            runtime, meta, record = load_variant(folder)
        except (InputError, ConfigError):
            raise
        except Exception as e:  # a broken artifact: named, as for an exported file below
            raise InputError(f"{folder} cannot be loaded: {error_text(e)}") from e
        row = variant_row(record["variant"])
        if p.is_file() and p.name not in (row.file, RECORD, META):
            raise InputError(
                f"{p} is not the artifact of variant {record['variant']} ({folder / row.file})"
            )
        return runtime, meta
    if p.is_dir():
        found = [f.name for f in sorted(p.iterdir()) if f.suffix in (*_EXPORT_SUFFIXES, ".pt")]
        raise InputError(
            f"{p} is a folder without {RECORD}: name one of its artifacts "
            f"({', '.join(found) or 'none found'})"
        )
    if p.suffix == ".pt":
        from oipipe.training.models import load_trained  # torch model code: only for a checkpoint

        model, meta = load_trained(p)
        return eager_runtime(model, device, channels_last), meta
    fmt = _EXPORT_SUFFIXES.get(p.suffix)
    if fmt is None:
        raise InputError(
            f"{p}: not an artifact of the pipeline (expected a variant folder, "
            f"{', '.join(sorted(_EXPORT_SUFFIXES))} or a .pt checkpoint)"
        )
    try:
        runtime = imported(FORMATS[fmt].loader)(p, **FORMATS[fmt].loader_args)
    except Exception as e:
        raise InputError(f"{p} cannot be loaded as {fmt}: {error_text(e)}") from e
    if not runtime.extra.get(META):
        raise InputError(f"{p} carries no {META}: not written by the export stage")
    return runtime, json.loads(runtime.extra[META])
