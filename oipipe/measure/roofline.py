"""How far each variant is from what the machine can do: a roofline point per benchmark row.

The benchmark measures this machine's practical peaks once per run, in seconds: a large matmul in
each precision its rows ran (fp32 and bf16 through `torch.matmul`, int8 through `torch._int_mm`,
int8 in and int32 out, the GEMM oneDNN's int8 kernels use; fp16 on CUDA), and its memory
bandwidth (a large tensor copy: bytes read plus bytes written per second). The best of the calls
made in a second is the peak: what torch's own kernels reach, not the data sheet's figure.

A row's point: its achieved GFLOP/s (the model's FLOPs per image times its images/s) as a share
of the peak of its precision, against its arithmetic intensity (FLOPs per byte moved). The bytes
are counted per aten op of one eager fp32 call (the profile stage's count: every op reads its
inputs and writes its output), at the row's element width (bf16 and fp16 half, int8 a quarter);
an engine that fuses ops moves less, so its real point lies further right. Weights are read once
per call and activations grow with the batch, so intensity grows with the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from oipipe.measure.opcount import OpCounter

MATMUL_N = 2048  # the square GEMM's size: large enough for every core's full rate
COPY_MIB = 512  # far beyond any last-level cache
SECONDS = 1.0  # per figure
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
PEAK_KEY = {
    "fp32": "fp32_gflops",
    "bf16": "bf16_gflops",
    "fp16": "fp16_gflops",
    "int8": "int8_gops",
}


def _best_rate(call: Callable[[], Any], work: float, device: str, seconds: float) -> float:
    """`work` units per second of the fastest of the calls made in `seconds` (after one warm-up
    call)."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    call()
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - t)
    return work / best


def matmul_peak(
    precision: str, device: str = "cpu", n: int = MATMUL_N, seconds: float = SECONDS
) -> float:
    """GFLOP/s (GOP/s for int8) of an n x n x n matmul in `precision`."""
    if precision == "int8":
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
        call = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        call = lambda: a @ b  # noqa: E731
    return _best_rate(call, 2.0 * n**3, device, seconds) / 1e9


def bandwidth(device: str = "cpu", mib: int = COPY_MIB, seconds: float = SECONDS) -> float:
    """GB/s of a large copy: bytes read plus bytes written."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4, device, seconds) / 1e9


def measure_peaks(precisions: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """Per device ("cpu", "cuda"), the matmul peak of each precision named there and the copy
    bandwidth; a precision whose GEMM torch cannot run there is left out with its error."""
    out: dict[str, dict[str, Any]] = {}
    for device, wanted in precisions.items():
        t0 = time.perf_counter()
        peaks: dict[str, Any] = {"bandwidth_gbs": round(bandwidth(device), 2)}
        for p in sorted(wanted | {"fp32"}):
            if p not in PEAK_KEY:
                continue
            try:
                peaks[PEAK_KEY[p]] = round(matmul_peak(p, device), 2)
            except (RuntimeError, NotImplementedError) as e:  # no such kernel on this device
                peaks[f"{PEAK_KEY[p]}_error"] = str(e).splitlines()[0][:300]
        peaks["threads"] = torch.get_num_threads() if device == "cpu" else None
        peaks["seconds"] = round(time.perf_counter() - t0, 2)
        out[device] = peaks
    return out


def flops_per_image(model: torch.nn.Module, input_size: int) -> float:
    """Forward FLOPs of one image (a multiply-add counts 2), counted by PyTorch's FlopCounter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def model_counts(model: torch.nn.Module, input_size: int) -> dict[str, float]:
    """What a variant whose network differs from the trained one (a pruned one) records, so
    its row's FLOP/s and roofline point count its own network: FLOPs per image and traffic."""
    fixed, per_image = traffic(model, input_size)
    return {
        "flops_per_image": flops_per_image(model, input_size),
        "fixed_bytes": fixed,
        "bytes_per_image": per_image,
    }


def traffic(model: torch.nn.Module, input_size: int) -> tuple[float, float]:
    """(bytes per call that do not grow with the batch, bytes per image), fp32, counted op by
    op on one eager call at batch 1 and one at batch 2 (the counts are linear in the batch)."""
    counts = []
    for batch in (1, 2):
        x = torch.randn(batch, 3, input_size, input_size)
        with OpCounter() as counter, torch.no_grad():
            model(x)
        counts.append(sum(counter.bytes.values()))
    per_image = counts[1] - counts[0]
    return counts[0] - per_image, per_image


def point(row: dict, flops_per_image: float, fixed: float, per_image: float, peaks: dict) -> dict:
    """A row's roofline columns: FLOPs per byte at its batch and element width, and its achieved
    GFLOP/s as a percentage of its device's peak in its precision (None where not measured)."""
    width = BYTES_PER_ELEMENT.get(str(row.get("precision")), 4) / 4
    batch = row["batch"]
    intensity = flops_per_image * batch / ((fixed + per_image * batch) * width)
    peak = (peaks.get(row.get("device") or "cpu") or {}).get(
        PEAK_KEY.get(str(row.get("precision")), "")
    )
    achieved = row.get("gflops_per_s")
    return {
        "intensity_flop_per_byte": round(intensity, 3),
        "peak_gflops": peak,
        "peak_pct": round(100 * achieved / peak, 2) if peak and achieved else None,
    }


def roofs(peaks: dict[str, dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(label, peak GFLOP/s, bandwidth GB/s) of every measured peak, for the chart."""
    return [
        (f"{device} {precision}", got[key], got["bandwidth_gbs"])
        for device, got in sorted(peaks.items())
        for precision, key in PEAK_KEY.items()
        if got.get(key) and got.get("bandwidth_gbs")
    ]
