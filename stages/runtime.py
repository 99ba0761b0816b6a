"""How any artifact of the pipeline is run: the export check, the optimize accuracy pass, the
benchmark (and the stream client) all load through here, so they run it the same way."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def torch_runtime(module: Callable, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  extra: dict[str, str] | None = None) -> Runtime:
    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Runtime(call=call, prepare=lambda x: x.to(device=device, dtype=dtype),
                   logits=lambda y: y.float().cpu().numpy(), device=device, sync=sync,
                   extra=extra or {})


def torchscript_runtime(file: Path, extra_files: tuple[str, ...] = ()) -> Runtime:
    extra = dict.fromkeys(extra_files, "")
    module = torch.jit.load(str(file), map_location="cpu", _extra_files=extra)
    return torch_runtime(module, extra=extra)


def program_runtime(file: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    extra_files: tuple[str, ...] = ()) -> Runtime:
    """A `torch.export` program (`.pt2` from torch.export.save, or Torch-TensorRT's `.ep`)."""
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
    return Runtime(call=lambda x: session.run(None, {name: x})[0],
                   prepare=lambda x: np.ascontiguousarray(x.numpy(), dtype=np.float32),
                   logits=lambda y: np.asarray(y, dtype=np.float32),
                   device="cuda" if session.get_providers()[0].startswith("CUDA") else "cpu",
                   extra=dict(session.get_modelmeta().custom_metadata_map))


@functools.cache  # /proc/cpuinfo does not change while the process runs
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ('model name', 'flags', ...); {} elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags() -> set[str]:
    return set(cpuinfo().get("flags", "").split())


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: without either, bf16 is emulated and slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
