"""Facts about the machine a stage runs on, gathered without importing torch.

The benchmark records them beside its rows; the report shows them, and gathers them live when no
benchmark has run; optimize asks whether bf16 is native (training does not: it times bf16 against
fp32, see `train.BF16_MIN_SPEEDUP`). None of that needs a deep-learning stack: the CPU comes from
/proc/cpuinfo, the GPU from `nvidia-smi`, library versions from the installed packages' metadata
(importing torch to read its version would cost the report seconds and gigabytes of libraries).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from oipipe.core.version import project_version

# What decides which CPU back end is fast: AVX-512 and VNNI for int8 (oneDNN's u8s8 kernels),
# AVX512-BF16 or AMX for bf16 (without either it is emulated and slower than fp32).
RELEVANT_CPU_FLAGS = frozenset(
    {"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni"}
)
LIBRARIES = ("torch", "torchvision", "onnxruntime", "torchao", "torch_tensorrt", "tensorrt")
NVIDIA_SMI_TIMEOUT_S = 20  # a wedged driver can hang nvidia-smi; these facts are not worth more


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
    """AMX-BF16 or AVX512-BF16: without either, bf16 is emulated and slower than fp32.

    The project's one answer to the question, from the kernel's flags, not from torch's private
    `torch.cpu._is_avx512_bf16_supported`/`_is_amx_tile_supported` (no stable API, needs torch,
    and asks about AMX tiles rather than AMX-BF16): the same flags `machine_info` records, so the
    `native_bf16` a benchmark shows is the one optimize decided by."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


@functools.cache  # measured once per process: about half a second where bf16 is emulated
def bf16_conv_slowdown(rounds: int = 3) -> float:
    """How many times slower a 3x3 convolution (64 channels, 56 x 56, batch 4, channels_last,
    one thread) runs in bfloat16 than in float32 on this CPU, best of `rounds` after a warm-up:
    what a bf16 variant would cost where bf16 is emulated. A convolution, not a matmul: on an
    AVX2-only EPYC the conv ratio (about 10x) is close to the whole model's (eager bf16 3.6
    against fp32 26.7 images/s), a 512 x 512 matmul's (about 57x) is not. One thread: the ratio
    then does not move with another process's load. Imports torch when called."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(4, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(memory_format=torch.channels_last)

        def best(dtype: torch.dtype) -> float:
            c, xi = conv.to(dtype), x.to(dtype)
            with torch.inference_mode():
                c(xi)
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    c(xi)
                    times.append(time.perf_counter() - start)
            return min(times)

        return best(torch.bfloat16) / best(torch.float32)
    finally:
        torch.set_num_threads(threads)


def gpu_info() -> tuple[str | None, str | None]:
    """(name, driver version) of the first GPU CUDA would use, from `nvidia-smi`; (None, None)
    without an NVIDIA driver, or when CUDA_VISIBLE_DEVICES hides every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    cmd = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    if visible is not None:
        first = visible.split(",")[0].strip()
        if not first or first.startswith("-"):  # "" or "-1": CUDA sees no device
            return None, None
        cmd.append(f"--id={first}")  # an index or a UUID, both of which nvidia-smi takes
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return None, None
    name, _, driver = lines[0].rpartition(",")  # a name may hold a comma; a driver version not
    return name.strip() or None, driver.strip() or None


def library_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def torch_cuda_version() -> str | None:
    """The CUDA version torch was built with (`torch.version.cuda`), read from torch/version.py
    without importing torch; None for a CPU build or when torch is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(file.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign):
            target, value_node = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value_node = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "cuda" and value_node is not None:
            try:
                value = ast.literal_eval(value_node)
            except ValueError:
                return None
            return value if isinstance(value, str) else None
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, GPU, driver, CUDA, Python, platform and library versions, as flat JSON."""
    cpu = cpuinfo().get("model name") or platform.processor() or "unknown"
    gpu, driver = gpu_info()
    return {
        "oi_pipeline": project_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "cpu_flags_relevant": sorted(RELEVANT_CPU_FLAGS & cpu_flags()),
        "gpu": gpu,
        "gpu_driver": driver,
        "cuda": torch_cuda_version() if gpu else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{pkg: library_version(pkg) for pkg in LIBRARIES},
    }
