"""The stream client's statistics: per-part CPU and wall time, latency percentiles, the summary
and its MLflow run."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oitools.stream.sources import FrameQueue

if TYPE_CHECKING:
    from oitools.stream.client import StreamOptions


log = logging.getLogger("oitools.stream")

# --- statistics ----------------------------------------------------------------------------------


@dataclass
class Stats:
    processed: int = 0
    batches: int = 0
    first_out: float | None = None  # perf_counter when the first frame was out
    last_out: float | None = None  # ... the last
    latency_ms: list[float] = field(default_factory=list)  # per frame: arrival -> out
    model_ms: list[float] = field(default_factory=list)  # per model call
    wall: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("preprocess", "model", "postprocess"), 0.0)
    )
    cpu: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("preprocess", "model", "postprocess"), 0.0)
    )
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=30))

    def fps_now(self) -> float:
        """Frames out per second over the last (up to) 30."""
        if len(self.recent) < 2 or self.recent[-1] == self.recent[0]:
            return 0.0
        return (len(self.recent) - 1) / (self.recent[-1] - self.recent[0])


@contextlib.contextmanager
def cpu_and_wall(stats: Stats, part: str) -> Iterator[None]:
    """Wall and process CPU seconds of one part of the loop. Process CPU counts every thread:
    inference's own pool during the model, the reader thread (a copy per frame) throughout."""
    w0, c0 = time.perf_counter(), time.process_time()
    yield
    stats.wall[part] += time.perf_counter() - w0
    stats.cpu[part] += time.process_time() - c0


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summary(
    stats: Stats,
    queue: FrameQueue | None,
    src: Any,
    decode_cpu: float,
    end: str,
    opts: StreamOptions,
) -> dict[str, Any]:
    """Flat JSON: counts, rates, latency percentiles and where the time went.

    decode_cpu_s is the GStreamer child's CPU seconds (decoding, conversion to BGR, network
    and depayloading), from getrusage once it has exited (with the OpenCV backend, the CPU time
    of the thread that called read()); the other parts are this process's CPU seconds around
    each step of the loop. The shares divide by their sum: where the machine's work went."""
    first, last = stats.first_out, stats.last_out
    span = last - first if first is not None and last is not None else 0.0
    caps = getattr(src, "caps", None) or {}
    cpu = {"decode": decode_cpu, **stats.cpu}
    total = sum(cpu.values())
    out: dict[str, Any] = {
        "source": opts.source,
        "model": str(opts.model),
        "backend": getattr(src, "name", None),
        "live": getattr(src, "live", None),
        "width": caps.get("width"),
        "height": caps.get("height"),
        "input_fps": caps.get("framerate"),
        "end": end,
        "batch": opts.batch,
        "drop": bool(queue.drop) if queue else None,
        "frames_received": queue.received if queue else 0,
        "frames_processed": stats.processed,
        "frames_dropped": queue.dropped if queue else 0,
        "model_calls": stats.batches,
        "mean_batch": round(stats.processed / stats.batches, 3) if stats.batches else None,
        "wall_s": round(span, 4),
        "fps": round((stats.processed - 1) / span, 3) if span > 0 else None,
    }
    for q in (50, 90, 99):
        out[f"latency_p{q}_ms"] = percentile(stats.latency_ms, q)
    for q in (50, 90, 99):
        out[f"model_p{q}_ms"] = percentile(stats.model_ms, q)
    for part, v in cpu.items():
        out[f"{part}_cpu_s"] = round(v, 4)
    for part, v in stats.wall.items():
        out[f"{part}_wall_s"] = round(v, 4)
    for part, v in cpu.items():
        out[f"{part}_share_pct"] = round(100 * v / total, 2) if total > 0 else None
    return out


def log_to_mlflow(result: dict[str, Any], opts: StreamOptions) -> str:
    """One MLflow run with the options as params and the numbers as `stream.*` metrics, in its
    own experiment: `oitools.compare` reads every top-level run of the pipeline's experiment as
    a pipeline job."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from oipipe.core.tracking import experiment_id, sqlite_file

    assert opts.mlflow_uri is not None
    db = sqlite_file(opts.mlflow_uri)
    location = (db.parent / "mlartifacts").as_uri() if db is not None else None
    exp = experiment_id(opts.mlflow_uri, opts.mlflow_experiment, location)
    client = MlflowClient(opts.mlflow_uri)
    run = client.create_run(exp, run_name=f"stream-{Path(opts.model).name}")
    now = int(time.time() * 1000)
    params = {k: v for k, v in asdict(opts).items() if k not in ("mlflow_uri",)}
    numbers = {
        f"stream.{k}": float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now, 0) for k, v in numbers.items()],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[
            RunTag("kind", "stream"),
            RunTag("end", str(result["end"])),
            RunTag("backend", str(result["backend"])),
        ],
    )
    client.set_terminated(
        run.info.run_id,
        "FINISHED" if result["end"] in ("eos", "stopped", "max_frames") else "FAILED",
    )
    log.info(
        "MLflow: run %s in experiment %s (%s)",
        run.info.run_id,
        opts.mlflow_experiment,
        opts.mlflow_uri,
    )
    return run.info.run_id
