"""How a runtime is timed, with the checks that come first: the pure measurement the benchmark's
worker runs (any `Runtime`, any inputs), one call at a time (`time_runtime`) and with several
requests in flight (`time_processes`, `time_openvino_async`). Every warm-up and timed trial runs
the one loop `calls`: at least N calls and at least S seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from oipipe.deploy.runtime import Runtime
from oipipe.measure import evaluation
from oipipe.measure.power import PowerSampler, PowerSource, energy_per_image


class CheckFailed(RuntimeError):
    """The variant's inputs or outputs fail a sanity check: the row is not timed."""


# --- the measurement itself (pure: any Runtime, any inputs) ---------------------------------------


def calls(min_iters: int, min_seconds: float) -> Iterator[int]:
    """0, 1, 2, ... for as long as a window lasts: at least `min_iters` calls and `min_seconds`
    seconds, both (the one loop of every warm-up and timed trial here)."""
    k, t0 = 0, time.perf_counter()
    while k < min_iters or time.perf_counter() - t0 < min_seconds:
        yield k
        k += 1


def check_inputs(batches: list[torch.Tensor]) -> None:
    if len(batches) < 2:
        raise CheckFailed("fewer than 2 distinct input batches: the test split is too small")
    for i, b in enumerate(batches):
        if not torch.isfinite(b).all() or float(b.float().std()) == 0.0:
            raise CheckFailed(f"input batch {i} is constant or not finite")
    for i in range(1, len(batches)):
        if torch.equal(batches[i], batches[0]):
            raise CheckFailed(f"input batches 0 and {i} are identical: nothing is rotated")


def check_outputs(
    runtime: Runtime,
    batches: list[torch.Tensor],
    reference: list[np.ndarray],
    min_agreement_pct: float,
) -> float:
    """Top-1 agreement of the variant with fp32 on the benchmark inputs, in percent; raises
    below the bar."""
    agree, total = 0, 0
    for x, ref in zip(batches, reference, strict=True):
        got = runtime(x)
        if got.shape != ref.shape:
            raise CheckFailed(f"output shape {got.shape}, fp32 gives {ref.shape}")
        if not np.isfinite(got).all():
            raise CheckFailed("non-finite logits")
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        total += len(ref)
    rate = 100 * agree / total
    if rate < min_agreement_pct:
        raise CheckFailed(
            f"top-1 agreement with fp32 on the benchmark inputs is {rate:.1f}%, "
            f"below benchmark.min_agreement_pct={min_agreement_pct:g}"
        )
    return rate


def warm_up(runtime: Runtime, inputs: list, iters: int, seconds: float) -> None:
    """Untimed calls through the prepared inputs in turn: at least `iters` and `seconds`."""
    for i in calls(iters, seconds):
        runtime.call(inputs[i % len(inputs)])
        runtime.sync()


def timed_trial(
    runtime: Runtime, inputs: list, protocol: DictConfig | dict, start: int = 0
) -> list[float]:
    """One timed trial: the seconds of each call, at least `min_iters` calls and `min_seconds`,
    through the prepared inputs in turn from `inputs[start + 1]`."""
    times: list[float] = []
    for k in calls(protocol["min_iters"], protocol["min_seconds"]):
        x = inputs[(start + k + 1) % len(inputs)]
        t = time.perf_counter()
        runtime.call(x)
        runtime.sync()
        times.append(time.perf_counter() - t)
    return times


def summarise(trials: list[list[float]], batch: int, windows: list[dict] | None = None) -> dict:
    """A row's timing columns from its trials (each a list of per-call seconds): throughput is
    the median trial's images/s, `throughput_rounds` every trial's in order (the benchmark's
    rounds: ratios within one round compare); latency in ms per batch over every timed call.
    `windows`: each trial's power window (`PowerSampler.result`), for power and energy."""
    throughputs = [batch * len(t) / sum(t) for t in trials]
    lat = np.array([x for t in trials for x in t]) * 1000
    energy = {}
    if windows:  # the median over trials, as throughput
        energy = {
            "power_avg_w": float(np.median([w["power_avg_w"] for w in windows])),
            "energy_per_image_j": float(
                np.median(
                    [
                        energy_per_image(w, batch * len(t))
                        for w, t in zip(windows, trials, strict=True)
                    ]
                )
            ),
            "power_source": windows[0]["power_source"],
        }
    return {
        **energy,
        "throughput": float(np.median(throughputs)),
        "throughput_min": float(min(throughputs)),
        "throughput_max": float(max(throughputs)),
        "throughput_std": float(np.std(throughputs)),
        "throughput_rounds": [float(t) for t in throughputs],
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_mean_ms": float(lat.mean()),
        "latency_p90_ms": float(np.percentile(lat, 90)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "iterations": len(lat),
        "trials": len(throughputs),
    }


def time_runtime(
    runtime: Runtime,
    batches: list[torch.Tensor],
    protocol: DictConfig | dict,
    power: PowerSource | None = None,
) -> dict[str, Any]:
    """Warm up, then `trials` timed trials of single calls, one after another (the benchmark
    interleaves its variants' trials instead: `oipipe.measure.rounds`); latency in ms per batch.
    With a `power` source (NVML on a GPU), each trial is also a power window: the row gets the
    median trial's average power and energy per image."""
    inputs = [runtime.prepare(x) for x in batches]
    warm_up(runtime, inputs, protocol["warmup_iters"], protocol["warmup_seconds"])
    sampler = PowerSampler(power) if power is not None else None
    trials: list[list[float]] = []
    windows: list[dict] = []
    for _ in range(protocol["trials"]):
        with sampler or contextlib.nullcontext():
            trials.append(timed_trial(runtime, inputs, protocol, sum(len(t) for t in trials)))
        if sampler is not None:
            if sampler.result is None:  # __exit__ sets it or raises
                raise RuntimeError("the power sampler ended its window without a result")
            windows.append(sampler.result)
    return summarise(trials, len(batches[0]), windows)


def rotated_batches(images: torch.Tensor, batch: int, count: int) -> list[torch.Tensor]:
    """`count` different batches of `batch` real images: evenly spaced start offsets, wrapping
    around a test split smaller than the batch. A split of fewer than `count` images gives one
    batch per image; a split of one image gives one batch, which `check_inputs` refuses."""
    n = len(images)
    offsets = sorted({k * n // count for k in range(count)})
    return [evaluation.fill(images, batch, o) for o in offsets]


# --- throughput mode: several requests in flight ---------------------------------------------


def _serving_process(
    load: Callable[[], Runtime],
    batches: list[torch.Tensor],
    protocol: dict,
    threads: int,
    barrier: Any,
    results: Any,
) -> None:
    """One of the throughput mode's processes: load the runtime with `threads` threads, warm up,
    then time `trials` windows of at least `min_iters` calls and `min_seconds`, each started
    with the other processes at the barrier; puts its images/s per window (or its error)."""
    try:
        torch.set_num_threads(threads)
        runtime = load()
        inputs = [runtime.prepare(x) for x in batches]
        for i in range(max(protocol["warmup_iters"], 1)):
            runtime.call(inputs[i % len(inputs)])
        runtime.sync()
        rates = []
        for _ in range(protocol["trials"]):
            barrier.wait(timeout=600)
            n, t0 = 0, time.perf_counter()
            for n in calls(protocol["min_iters"], protocol["min_seconds"]):
                runtime.call(inputs[n % len(inputs)])
                runtime.sync()
            rates.append((n + 1) * len(batches[0]) / (time.perf_counter() - t0))
        results.put(rates)
    except BaseException as e:
        barrier.abort()  # the others stop waiting; the row records this error
        results.put(f"{type(e).__name__}: {e}")
        raise


def time_processes(
    load: Callable[[], Runtime],
    batches: list[torch.Tensor],
    protocol: dict,
    concurrency: int,
    threads: int,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Images/s of `concurrency` processes running the same runtime together, one request each (a
    pool of serving workers; any engine): the sum of their rates in each trial window, the
    median over trials. Each gets `threads // concurrency` threads (at least 1) and the same input
    batches; `load` is picklable (a fresh interpreter calls it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited threads or state
    barrier, results = ctx.Barrier(concurrency), ctx.Queue()
    each = max(threads // concurrency, 1)
    procs = [
        ctx.Process(
            target=_serving_process,
            daemon=True,
            args=(load, batches, protocol, each, barrier, results),
        )
        for _ in range(concurrency)
    ]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [g for g in got if isinstance(g, str)]
    if errors:
        raise RuntimeError(f"a throughput-mode process failed: {errors[0]}")
    trials = [sum(r) for r in zip(*got, strict=True)]
    return {
        "throughput_concurrent": float(np.median(trials)),
        "throughput_concurrent_min": float(min(trials)),
        "throughput_concurrent_max": float(max(trials)),
        "concurrency": concurrency,
        "concurrency_method": f"{concurrency} processes x {each} threads, one request each",
    }


def time_openvino_async(
    folder: Path,
    record: dict,
    batches: list[torch.Tensor],
    protocol: dict,
    threads: int,
    streams: int,
) -> dict[str, Any]:
    """OpenVINO's own throughput mode: the IR compiled with the THROUGHPUT hint (OpenVINO picks
    its streams for `threads` threads), fed by an AsyncInferQueue of its optimal size.
    `streams` (benchmark.throughput_mode.concurrency) is passed as num_streams when set."""
    import openvino as ov
    import openvino.properties as props

    from oipipe.deploy.runtime import openvino_compile, variant_row

    file = folder / variant_row(record["variant"]).file
    compiled, _ = openvino_compile(
        file, record["precision"], threads, hint="THROUGHPUT", streams=streams
    )
    requests = int(compiled.get_property(props.optimal_number_of_infer_requests))
    queue = ov.AsyncInferQueue(compiled, requests)
    inputs = [np.ascontiguousarray(x.numpy(), dtype=np.float32) for x in batches]
    n = len(batches[0])
    for i in range(max(protocol["warmup_iters"], requests)):
        queue.start_async({0: inputs[i % len(inputs)]})
    queue.wait_all()
    rates = []
    for _ in range(protocol["trials"]):
        k, t0 = 0, time.perf_counter()
        for k in calls(protocol["min_iters"], protocol["min_seconds"]):
            queue.start_async({0: inputs[k % len(inputs)]})  # blocks while every request is busy
        queue.wait_all()
        rates.append((k + 1) * n / (time.perf_counter() - t0))
    got_streams = int(compiled.get_property(props.num_streams))
    return {
        "throughput_concurrent": float(np.median(rates)),
        "throughput_concurrent_min": float(min(rates)),
        "throughput_concurrent_max": float(max(rates)),
        "concurrency": got_streams,
        "concurrency_method": (
            f"OpenVINO THROUGHPUT hint: {got_streams} streams, "
            f"AsyncInferQueue of {requests} requests, {threads} threads"
        ),
    }
