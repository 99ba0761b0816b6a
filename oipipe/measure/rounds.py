"""Interleaved timing: every contender loaded at once, timed in turn, round after round.

A benchmark that times variant A's trials, then B's, then C's compares rows taken minutes apart;
on a shared machine or a laptop a noisy minute then decides the table. Here round r at batch b
is one trial of every contender in turn (A B C, then B C A, then C A B: no contender is always
first after a pause), so a load burst lasting a round slows every row of that round, and a
speed-up read per round (A's trial over the baseline's trial of the same round, `round_ratios`)
cancels it. The contenders may be in-process (`LocalContender`, what each benchmark worker runs
and what the tests drive) or anything with the same two methods (the benchmark's worker
processes, `stages.benchmark.WorkerProcess`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from oipipe.deploy.runtime import Runtime
from oipipe.measure.power import PowerReadError, PowerSampler, PowerSource
from oipipe.measure.timing import timed_trial, warm_up


class ContenderFailed(RuntimeError):
    """A contender's trial failed. `fatal`: it can time nothing more (its process died)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Contender(Protocol):
    name: str

    def takes(self, batch: int) -> bool:
        """Whether it is timed at `batch` (its checks there passed)."""
        ...

    def trial(self, batch: int) -> dict[str, Any]:
        """One timed trial: {"times": [seconds per call, ...]} and, with a power source,
        "power" (the window's `PowerSampler.result`). Raises ContenderFailed."""
        ...


class LocalContender:
    """A runtime timed in this process. Built with its prepared inputs per batch size and a
    full warm-up at each (`warmup_iters` calls and `warmup_seconds`); each trial starts with
    `warmup_iters` untimed calls again (another contender ran since: caches, frequency and
    thread pools are back to that contender's), then one timed trial."""

    def __init__(
        self,
        name: str,
        runtime: Runtime,
        batches: dict[int, list[torch.Tensor]],
        protocol: dict,
        power: PowerSource | None = None,
    ) -> None:
        self.name, self.runtime, self.protocol = name, runtime, protocol
        self.raw, self.power = batches, power
        self.inputs = {b: [runtime.prepare(x) for x in xs] for b, xs in batches.items()}
        self.sampler = PowerSampler(power) if power is not None else None
        self.power_error: str | None = None  # why power stopped being read, if it did
        self.power_note: str | None = None  # why it was never read (no NVML), if so
        self.calls = {b: 0 for b in batches}
        for xs in self.inputs.values():
            warm_up(runtime, xs, protocol["warmup_iters"], protocol["warmup_seconds"])

    def takes(self, batch: int) -> bool:
        return batch in self.inputs

    def trial(self, batch: int) -> dict[str, Any]:
        inputs = self.inputs[batch]
        warm_up(self.runtime, inputs, self.protocol["warmup_iters"], 0.0)
        try:
            out = self._timed(batch, inputs, self.sampler)
        except PowerReadError as e:  # the power figures would be wrong: time without them
            self.power_error, self.sampler = str(e), None
            out = self._timed(batch, inputs, None)
        self.calls[batch] += len(out["times"])
        return out

    def _timed(self, batch: int, inputs: list, sampler: PowerSampler | None) -> dict[str, Any]:
        with sampler or contextlib.nullcontext():
            times = timed_trial(self.runtime, inputs, self.protocol, self.calls[batch])
        out: dict[str, Any] = {"times": times}
        if sampler is not None:
            if sampler.result is None:  # __exit__ sets it or raises
                raise RuntimeError("the power sampler ended its window without a result")
            out["power"] = sampler.result
        return out


@dataclass
class Outcome:
    """What `interleave` measured: each (name, batch)'s trials in round order, the errors of the
    rows that could not be timed, and one entry per round (batch, order, seconds, the 1-minute
    load average at its end)."""

    trials: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    errors: dict[tuple[str, int], str] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


def interleave(
    contenders: Sequence[Contender],
    batch_sizes: Sequence[int],
    trials: int,
    on_trial: Callable[[str, int, int], None] | None = None,
) -> Outcome:
    """`trials` rounds at each batch size; round r is one trial of every contender that takes
    the batch, in turn, starting r places further along. A failed trial fails that contender's
    row at that batch (a fatal one every row it has left); the others go on. `on_trial(name,
    batch, round)` is called after each trial (progress)."""
    out = Outcome()
    dead: set[str] = set()
    for batch in batch_sizes:
        live = [c for c in contenders if c.name not in dead and c.takes(batch)]
        for r in range(trials):
            t0 = time.perf_counter()
            k = r % len(live) if live else 0
            order = [c for c in live[k:] + live[:k] if (c.name, batch) not in out.errors]
            for c in order:
                if c.name in dead:
                    out.errors[c.name, batch] = out.errors.get((c.name, batch), "worker died")
                    continue
                try:
                    out.trials.setdefault((c.name, batch), []).append(c.trial(batch))
                except ContenderFailed as e:
                    out.errors[c.name, batch] = str(e)
                    out.trials.pop((c.name, batch), None)
                    if e.fatal:
                        dead.add(c.name)
                        for b in batch_sizes[batch_sizes.index(batch) + 1 :]:
                            if c.takes(b):
                                out.errors[c.name, b] = f"not timed: at batch {batch}: {e}"
                if on_trial is not None:
                    on_trial(c.name, batch, r)
            out.rounds.append(
                {
                    "batch": batch,
                    "round": r,
                    "order": [c.name for c in order],
                    "seconds": round(time.perf_counter() - t0, 3),
                    "load_1min": round(os.getloadavg()[0], 2),
                }
            )
    return out


def round_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a's throughput over b's in each round (both measured in the same rounds)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"round counts differ: {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b, strict=True)]


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """The median and the spread of per-round ratios."""
    return {
        "median": float(np.median(ratios)),
        "min": float(min(ratios)),
        "max": float(max(ratios)),
    }
