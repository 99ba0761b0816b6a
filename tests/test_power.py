"""oipipe.measure.power: power and energy over a timed window, with real threads and fake sources.

The sources are functions of `time.perf_counter`, so the energy they deliver over the window is
known in closed form; NVML itself is replaced by a fake `pynvml` module where its units matter.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from types import SimpleNamespace

import pytest

from oipipe.measure import machine
from oipipe.measure.power import (
    ENERGY_COUNTER,
    POWER_SAMPLES,
    PowerReadError,
    PowerSampler,
    PowerSource,
    cuda_pci_bus_id,
    energy_per_image,
    nvml_sampler,
    trapezoid_joules,
)

WINDOW_S = 0.2  # 4 sampling intervals of 0.05 s: long enough for several samples, short to run


def no_sampler_thread() -> bool:
    return not any(t.name == "power-sampler" for t in threading.enumerate())


class Ramp:
    """Watts rising linearly with time; records when each reading was taken. `slow_call`: that
    call (1-based) blocks for 0.07 s first, so the samples are unevenly spaced."""

    def __init__(self, base: float = 100.0, slope: float = 400.0, slow_call: int = 0) -> None:
        self.t0 = time.perf_counter()
        self.base, self.slope, self.slow_call = base, slope, slow_call
        self.times: list[float] = []

    def __call__(self) -> float:
        if len(self.times) + 1 == self.slow_call:
            time.sleep(0.07)
        t = time.perf_counter()
        self.times.append(t)
        return self.base + self.slope * (t - self.t0)

    def energy(self, a: float, b: float) -> float:
        """The exact integral of the ramp from a to b, in J."""
        return self.base * (b - a) + self.slope / 2 * ((b - self.t0) ** 2 - (a - self.t0) ** 2)


def test_trapezoid_uses_the_real_uneven_timestamps() -> None:
    # 0.1 s at a mean of 150 W, then 0.3 s at 200 W: 15 + 60 J. The mean of the samples times the
    # span would give 166.7 W x 0.4 s = 66.7 J; a left sum 100x0.1 + 200x0.3 = 70 J.
    assert trapezoid_joules([(0.0, 100.0), (0.1, 200.0), (0.4, 200.0)]) == pytest.approx(75.0)
    assert trapezoid_joules([(1.0, 50.0)]) == 0.0


def test_constant_power_gives_that_power_and_power_times_seconds() -> None:
    with PowerSampler(lambda: 150.0, interval=0.05) as sampler:
        time.sleep(WINDOW_S)
    r = sampler.result
    assert r["power_source"] == POWER_SAMPLES
    assert r["power_avg_w"] == pytest.approx(150.0)
    assert r["energy_j"] == pytest.approx(150.0 * r["seconds"])
    assert r["seconds"] == pytest.approx(WINDOW_S, abs=0.05)
    assert r["samples"] >= 4  # the first and last readings and ~3 from the thread
    assert no_sampler_thread()


def test_ramp_integrates_to_the_exact_energy_over_uneven_samples() -> None:
    ramp = Ramp(slow_call=3)  # the thread's second reading arrives 0.07 s late
    with PowerSampler(ramp, interval=0.05) as sampler:
        time.sleep(WINDOW_S)
    r = sampler.result
    first, last = ramp.times[0], ramp.times[-1]
    # the trapezoid rule is exact for a linear function on any grid, so only the microseconds
    # between a reading and its timestamp are left
    assert r["energy_j"] == pytest.approx(ramp.energy(first, last), rel=1e-3)
    assert r["seconds"] == pytest.approx(last - first, abs=1e-3)
    assert r["power_avg_w"] == pytest.approx(r["energy_j"] / r["seconds"])
    assert r["samples"] == len(ramp.times)
    assert r["power_source"] == POWER_SAMPLES


def test_the_energy_counter_is_preferred_to_the_samples() -> None:
    start = time.perf_counter()
    counter = PowerSource(
        watts=lambda: 10.0,  # deliberately not the counter's 250 W
        joules=lambda: 5_000.0 + 250.0 * (time.perf_counter() - start),
    )
    with PowerSampler(counter, interval=0.05) as sampler:
        time.sleep(WINDOW_S)
    r = sampler.result
    assert r["power_source"] == ENERGY_COUNTER
    assert r["power_avg_w"] == pytest.approx(250.0, rel=1e-3)
    assert r["energy_j"] == pytest.approx(250.0 * r["seconds"], rel=1e-3)
    assert r["samples"] >= 4


def test_a_sampler_times_several_windows_one_after_another() -> None:
    ramp = Ramp()
    sampler = PowerSampler(ramp, interval=0.01)
    for _ in range(2):
        before = len(ramp.times)
        with sampler:
            time.sleep(0.03)
        mine = ramp.times[before:]  # this window's readings, none of the last one's
        assert sampler.result["samples"] == len(mine)
        assert sampler.result["energy_j"] == pytest.approx(ramp.energy(mine[0], mine[-1]), rel=1e-3)
        time.sleep(0.02)  # a gap between windows that must not count
    assert no_sampler_thread()


def test_the_thread_stops_and_the_body_error_propagates() -> None:
    sampler = PowerSampler(lambda: 75.0, interval=0.01)
    with pytest.raises(KeyError, match="boom"), sampler:
        time.sleep(0.05)
        assert not no_sampler_thread()  # it was running
        raise KeyError("boom")
    assert no_sampler_thread()
    assert sampler.result is None


def test_a_failing_read_is_raised_and_the_thread_stops() -> None:
    calls = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("sensor unplugged")
        return 60.0

    with pytest.raises(PowerReadError, match="sensor unplugged"), PowerSampler(flaky, 0.01):
        time.sleep(0.1)
    assert no_sampler_thread()


def test_energy_per_image() -> None:
    assert energy_per_image({"energy_j": 12.0}, 48) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="images must be > 0"):
        energy_per_image({"energy_j": 12.0}, 0)


def test_pci_bus_id_of_a_cuda_device() -> None:
    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x65, pci_device_id=0)
    assert cuda_pci_bus_id(props) == "00000000:65:00.0"


def test_nvml_sampler_on_a_machine_without_a_gpu() -> None:
    if machine.gpu_info()[0] is not None:
        pytest.skip("an NVIDIA GPU is present: nvml_sampler is expected to open it")
    source, reason = nvml_sampler(0)
    assert source is None
    assert reason and ("not installed" in reason or "NVML" in reason)


class FakeNVMLError(Exception):
    pass


def fake_pynvml(monkeypatch, init_error: bool = False, counter: bool = True) -> SimpleNamespace:
    """A `pynvml` in sys.modules speaking NVML's units: mW for power, mJ for energy."""
    calls = SimpleNamespace(init=0, shutdown=0)
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError

    def init():
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")
        calls.init += 1

    def energy(handle):
        if not counter:
            raise FakeNVMLError("Not Supported")
        return 123_456_789  # mJ

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: setattr(calls, "shutdown", calls.shutdown + 1)
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("index", i)
    mod.nvmlDeviceGetHandleByPciBusId = lambda s: ("bus", s)
    mod.nvmlDeviceGetPowerUsage = lambda handle: 287_500  # mW
    mod.nvmlDeviceGetTotalEnergyConsumption = energy
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    return calls


def test_nvml_sampler_without_a_driver_says_why(monkeypatch) -> None:
    fake_pynvml(monkeypatch, init_error=True)
    source, reason = nvml_sampler(0)
    assert source is None and "Driver Not Loaded" in reason


def test_nvml_sampler_converts_nvml_units(monkeypatch) -> None:
    calls = fake_pynvml(monkeypatch)
    source, reason = nvml_sampler("00000000:65:00.0")
    assert reason is None
    assert source.watts() == pytest.approx(287.5)
    assert source.joules() == pytest.approx(123_456.789)
    source.close()
    source.close()
    assert (calls.init, calls.shutdown) == (1, 1)


def test_nvml_sampler_integrates_power_where_the_gpu_has_no_counter(monkeypatch) -> None:
    fake_pynvml(monkeypatch, counter=False)
    source, reason = nvml_sampler(0)
    assert reason is None and source.joules is None
    with PowerSampler(source, interval=0.01) as sampler:
        time.sleep(0.03)
    assert sampler.result["power_source"] == POWER_SAMPLES
    assert sampler.result["power_avg_w"] == pytest.approx(287.5)
