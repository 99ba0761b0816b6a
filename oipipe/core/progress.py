"""Progress bars for a person at a terminal; nothing but the log lines for CI and log files.

One rule for every stage: a bar is drawn only when stderr is a terminal and `CI` is unset (or
0/false/no). `dvc repro` piped to a file, a CI job, and the tests' subprocesses get the stages'
log lines alone, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")


def quiet() -> bool:
    """True under CI or when stderr is not a terminal: no bar is drawn."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or not sys.stderr.isatty()


def bar(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled when `quiet()`."""
    return tqdm(iterable, disable=quiet(), **kwargs)


@contextlib.contextmanager
def steps(
    total: int | None, desc: str, unit: str = "step", tick: float | None = 1.0, **kwargs
) -> Iterator[tqdm]:
    """A bar over the steps of a long job (update it per step, set its description to the step).

    While it is shown, log lines print above it rather than through it, and with `tick` its
    clock is redrawn every `tick` seconds, since one step may be a single call of a minute (a
    compile). tick=None where something else is being timed meanwhile (the benchmark)."""
    with bar(total=total, desc=desc, unit=unit, leave=False, **kwargs) as b:
        if b.disable:
            yield b
            return
        stop = threading.Event()

        def redraw() -> None:
            while not stop.wait(tick):
                b.refresh()

        clock = threading.Thread(target=redraw, daemon=True) if tick else None
        with logging_redirect_tqdm():
            if clock:
                clock.start()
            try:
                yield b
            finally:
                stop.set()
                if clock:
                    clock.join()


def counted(
    iterable: Iterable[T], total: int | None, desc: str, unit: str = "batch"
) -> Iterator[T]:
    """`iterable`'s items, counted on a bar (e.g. calibration batches pulled by a quantizer)."""
    with steps(total, desc, unit) as b:
        for item in iterable:
            yield item
            b.update(1)


@contextlib.contextmanager
def phase(log: logging.Logger, what: str) -> Iterator[None]:
    """One long call (a compile): a log line when it starts and, on a terminal, a running clock."""
    log.info("%s", what)
    with steps(None, what, bar_format="{desc}: {elapsed}"):
        yield
