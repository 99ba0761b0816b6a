"""GPU power and energy over a timed window, read through NVML (`nvidia-ml-py`, module `pynvml`).

`PowerSampler` wraps one timed trial: a background thread reads the power every `interval`
seconds, and on exit the window's energy comes from NVML's energy counter where the GPU has one,
else from the trapezoid rule over the power samples at their real timestamps. `nvml_sampler`
opens a GPU for it, or says why it cannot (no `pynvml`, no driver): it never raises, so a CPU-only
machine loses only the power columns.

NVML calls used, as nvidia-ml-py 13.615.71 wraps them (`pynvml.py`), with units from NVIDIA's
NVML API reference:
- `nvmlInit` / `nvmlShutdown`: reference-counted. `nvmlInit` raises `NVMLError` when
  `libnvidia-ml.so.1` cannot be loaded (`NVML_ERROR_LIBRARY_NOT_FOUND`) or no driver is loaded
  (`NVML_ERROR_DRIVER_NOT_LOADED`).
- `nvmlDeviceGetHandleByIndex(i)`: NVML's order is PCI bus order and ignores
  `CUDA_VISIBLE_DEVICES`, so it can differ from CUDA's index; `nvmlDeviceGetHandleByPciBusId(s)`
  ("domain:bus:device.function", hex) names the GPU CUDA uses without that ambiguity (see
  `cuda_pci_bus_id`).
- `nvmlDeviceGetTotalEnergyConsumption(handle)`: millijoules since the driver was last reloaded
  (uint64), Volta and newer; older GPUs answer `NVML_ERROR_NOT_SUPPORTED`.
- `nvmlDeviceGetPowerUsage(handle)`: milliwatts, the board including its memory. On Ampere
  (except GA100) and newer it is an average over the last second, instantaneous on GA100 and
  older, so integrating it smears a trial's edges by up to ~1 s; the counter does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("oipipe.measure.power")

ENERGY_COUNTER = "nvml_energy_counter"
POWER_SAMPLES = "nvml_power_samples"
# 20 reads/s: a 3 s trial (the default protocol's min_seconds) gets ~60 samples, and each read is
# a ctypes call that releases the GIL, so the timed loop loses well under 0.1 % to the thread.
DEFAULT_INTERVAL_S = 0.05
# A read that has not returned by then is a wedged driver, not a slow one.
JOIN_TIMEOUT_S = 5.0


class PowerReadError(RuntimeError):
    """A power or energy read failed inside the window: the figures would be wrong, not absent."""


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class PowerSource:
    """What a `PowerSampler` reads.

    `watts()`: the power now, in W. `joules()`: an energy counter in J that only grows, or None
    to integrate `watts` instead. `close()`: release the device (NVML's reference count)."""

    watts: Callable[[], float]
    joules: Callable[[], float] | None = None
    close: Callable[[], None] = field(default=_nothing)


class PowerSampler:
    """Power and energy over a `with` block: `result` holds `power_avg_w`, `energy_j`,
    `seconds`, `samples` (power readings taken) and `power_source` (`ENERGY_COUNTER` or
    `POWER_SAMPLES`) once the block has ended without an exception.

    `source` is a `PowerSource`, or a plain callable returning watts (integrated). One sampler
    can time several windows one after another; each `with` replaces `result`."""

    def __init__(
        self,
        source: PowerSource | Callable[[], float],
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.source = source if isinstance(source, PowerSource) else PowerSource(watts=source)
        self.interval = interval
        self.clock = clock
        self.result: dict[str, Any] | None = None
        self._samples: list[tuple[float, float]] = []
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start: tuple[float, float] | None = None

    def __enter__(self) -> PowerSampler:
        if self._thread is not None:
            raise RuntimeError("this PowerSampler is already running: one window at a time")
        self.result, self._samples, self._error = None, [], None
        self._stop.clear()
        if self.source.joules is not None:
            self._start = (self.clock(), float(self.source.joules()))
        self._sample()  # the window's first reading, so the integral starts at the window
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            raise RuntimeError("the power sampler was left without being entered")
        wait = max(JOIN_TIMEOUT_S, 10 * self.interval)
        thread.join(timeout=wait)
        problem = None
        if thread.is_alive():
            problem = (
                f"the power sampler's read has not returned after {wait:.0f} s "
                "(a wedged NVIDIA driver?); the thread is left behind as a daemon"
            )
        elif self._error is not None:
            problem = f"a power read failed: {type(self._error).__name__}: {self._error}"
        if exc is not None:  # the body's own exception is the one to report
            if problem:
                log.warning("%s (while the timed block failed with %s)", problem, exc_type.__name__)
            return
        if problem:
            raise PowerReadError(problem) from self._error
        try:
            self._sample()  # the window's last reading
            end = (
                (self.clock(), float(self.source.joules()))
                if self.source.joules is not None
                else None
            )
        except Exception as e:
            raise PowerReadError(f"a power read failed: {type(e).__name__}: {e}") from e
        self.result = self._result(end)

    def _sample(self) -> None:
        watts = float(self.source.watts())
        # stamped when the reading arrives: a slow read is placed where its value was taken
        self._samples.append((self.clock(), watts))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self._sample()
        except Exception as e:  # not swallowed: __exit__ raises it (or logs it beside the body's)
            self._error = e

    def _result(self, end: tuple[float, float] | None) -> dict[str, Any]:
        if end is not None and self._start is not None:
            seconds = end[0] - self._start[0]
            energy = end[1] - self._start[1]
            if energy < 0:
                raise PowerReadError(
                    f"the energy counter went backwards by {-energy:.3f} J: "
                    "the NVIDIA driver was reloaded during the window"
                )
            how = ENERGY_COUNTER
        else:
            seconds = self._samples[-1][0] - self._samples[0][0]
            energy = trapezoid_joules(self._samples)
            how = POWER_SAMPLES
        return {
            "power_avg_w": energy / seconds if seconds > 0 else None,
            "energy_j": energy,
            "seconds": seconds,
            "samples": len(self._samples),
            "power_source": how,
        }


def trapezoid_joules(samples: Sequence[tuple[float, float]]) -> float:
    """Energy in J of (seconds, watts) samples by the trapezoid rule over their own timestamps
    (uneven spacing included); 0.0 for fewer than two samples."""
    return sum(
        (t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:], strict=False)
    )


def energy_per_image(result: dict[str, Any], images: int) -> float:
    """J per image: a window's `energy_j` over the images processed in it."""
    if images <= 0:
        raise ValueError(f"images must be > 0 to divide the window's energy, got {images}")
    return result["energy_j"] / images


def cuda_pci_bus_id(props: Any) -> str:
    """NVML's "domain:bus:device.function" (hex) for a CUDA device, from
    `torch.cuda.get_device_properties(i)` (`pci_domain_id`, `pci_bus_id`, `pci_device_id`): the
    GPU CUDA calls `i`, whatever `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER` say."""
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def nvml_sampler(device: int | str = 0) -> tuple[PowerSource | None, str | None]:
    """(a `PowerSource` for GPU `device`, None), or (None, why not). Never raises.

    `device`: NVML's index (PCI bus order, not necessarily CUDA's), or a PCI bus id string as
    `cuda_pci_bus_id` gives. Watts come from `nvmlDeviceGetPowerUsage` (mW / 1000); joules from
    `nvmlDeviceGetTotalEnergyConsumption` (mJ / 1000) where the GPU has the counter (Volta and
    newer), else the sampler integrates the watts."""
    try:
        import pynvml
    except ImportError:
        return None, (
            "nvidia-ml-py (module pynvml) is not installed: "
            "pip install -e '.[trt]' to get the power columns"
        )
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML cannot start ({e}): no NVIDIA driver on this machine"
    try:
        handle = (
            pynvml.nvmlDeviceGetHandleByPciBusId(device)
            if isinstance(device, str)
            else pynvml.nvmlDeviceGetHandleByIndex(device)
        )
        pynvml.nvmlDeviceGetPowerUsage(handle)
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        return None, f"NVML cannot read the power of GPU {device!r}: {e}"

    def watts() -> float:
        return pynvml.nvmlDeviceGetPowerUsage(handle) / 1000

    def counter_joules() -> float:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000

    joules: Callable[[], float] | None = None
    try:
        counter_joules()
        joules = counter_joules
    except pynvml.NVMLError as e:
        # pre-Volta GPUs answer NOT_SUPPORTED; the result's power_source says samples were used
        log.info("GPU %r has no NVML energy counter (%s): integrating power samples", device, e)
    closed = threading.Event()

    def close() -> None:  # once: nvmlShutdown undoes one nvmlInit
        if not closed.is_set():
            closed.set()
            pynvml.nvmlShutdown()

    return PowerSource(watts=watts, joules=joules, close=close), None
