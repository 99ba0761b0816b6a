"""Entry point `python -m oitools.stream`: classify a live video stream with any artifact of the
pipeline (usage, options and exit codes: README, "Live inference on a GStreamer stream", and
`--help`). The other modules of this package are its sections: sources (frames in), preprocess,
sinks (frames out), stats.

Not a DVC stage (a stream is no versioned input) but a peer of the stages: it imports no stage
module, only `runtime` (how every artifact is loaded and run), `config`/`errors` and, with
`--mlflow`, `tracking`. It never imports torchvision: an edge box running an ONNX file needs
onnxruntime, numpy, OpenCV and Pillow (torch comes with `oipipe.deploy.runtime`).

Frames: OpenCV's GStreamer backend (an `appsink`) when the installed OpenCV was built with it
(`cv2.getBuildInformation()`: "GStreamer: YES"; the PyPI wheels are not), otherwise a
`gst-launch-1.0 -v` child writing raw BGR frames to a pipe (`fdsink fd=N`, its own descriptor:
gst-launch prints progress and `-v` notifications on stdout) and this process reading whole frames
from it. Width, height and frame rate come from the caps the sink negotiated, which `-v` prints;
a BGR row is padded to a multiple of 4 bytes (GStreamer's default stride), so a frame is
`height * round_up_4(3 * width)` bytes.

Per frame, the preprocessing of the artifact's metadata is what `datasets.eval_transform`
does, in numpy and Pillow (no torchvision), so a frame is classified as the test images were.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oipipe.core import cli
from oipipe.core.errors import InputError
from oitools.stream.preprocess import Preprocess
from oitools.stream.sinks import TRANSFORMS, VIDEO_CODECS, Display, VideoOut, annotate
from oitools.stream.sources import BACKENDS, FrameQueue, Stalled, open_source
from oitools.stream.stats import Stats, cpu_and_wall, log_to_mlflow, summary

log = logging.getLogger("oitools.stream")

DROP_MODES = ("auto", "yes", "no")


# --- what the client is asked to do --------------------------------------------------------------


@dataclass
class StreamOptions:
    source: str
    model: Path
    backend: str = "auto"  # auto | gst-launch | opencv
    batch: int = 1  # frames per model call, at most (what is queued; no waiting)
    drop: str = "auto"  # auto: drop stale frames iff the pipeline is live
    topk: int = 3
    transforms: list[str] = field(default_factory=list)  # applied in order before display/output
    display: bool = False
    out: Path | None = None  # annotated video (.avi, .mp4, .mkv)
    json_lines: bool = False  # one JSON line per processed frame on stdout
    stats: Path | None = None  # the summary as flat JSON
    stall_timeout: float = 10.0  # seconds without a frame before the stream counts as stalled
    max_frames: int = 0  # stop after this many processed frames (0: no limit)
    mlflow_uri: str | None = None  # log the summary to MLflow (a run under this tracking URI)
    mlflow_experiment: str = "oi-pipeline-stream"

    def check(self) -> None:
        if self.backend not in ("auto", *BACKENDS):
            raise InputError(
                f"unknown backend {self.backend!r}; expected one of {sorted(['auto', *BACKENDS])}"
            )
        if self.drop not in DROP_MODES:
            raise InputError(
                f"unknown drop mode {self.drop!r}; expected one of {sorted(DROP_MODES)}"
            )
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise InputError(
                f"unknown transform(s) {unknown}; expected any of {sorted(TRANSFORMS)}"
            )
        if self.batch < 1 or self.topk < 1 or self.max_frames < 0 or self.stall_timeout <= 0:
            raise InputError(
                "--batch >= 1, --topk >= 1, --max-frames >= 0 and --stall-timeout > 0 are required"
            )
        if self.out is not None and self.out.suffix.lower() not in VIDEO_CODECS:
            raise InputError(
                f"--out {self.out}: unknown video extension; expected one of {sorted(VIDEO_CODECS)}"
            )


# --- the loop ------------------------------------------------------------------------------------


def load_model(target: Path) -> tuple[Any, dict]:
    from oipipe.deploy.runtime import load_artifact

    runtime, meta = load_artifact(target)  # a broken artifact is an InputError naming it
    missing = [k for k in ("classes", "input_size", "mean", "std", "crop_pct") if k not in meta]
    if missing:
        raise InputError(f"{target}: its metadata lacks {missing}; not an artifact of the pipeline")
    return runtime, meta


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def run(opts: StreamOptions) -> dict[str, Any]:
    """Classify every frame of the stream (or the newest ones, when dropping) until it ends.
    Returns the summary; `--stats` and `--mlflow` get it too, also when the stream fails."""
    opts.check()
    runtime, meta = load_model(opts.model)
    log.info(
        "model %s: %s, %d classes, input %d px",
        opts.model,
        meta.get("arch", "?"),
        len(meta["classes"]),
        meta["input_size"],
    )
    display = Display() if opts.display else None
    stop = threading.Event()
    handlers: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: no more waiting
            raise KeyboardInterrupt
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    stats, queue, src, video = Stats(), None, None, None
    end, decode_cpu = "error", 0.0
    try:
        src = open_source(opts)
        if threading.current_thread() is threading.main_thread():
            handlers = {n: signal.signal(n, on_signal) for n in (signal.SIGINT, signal.SIGTERM)}
        end = "stopped"
        if src.wait_ready(opts.stall_timeout, stop):
            drop = src.live if opts.drop == "auto" else opts.drop == "yes"
            # dropping: the newest batch only; not dropping: two batches (one decoded while one
            # is classified)
            queue = FrameQueue(opts.batch if drop else 2 * opts.batch, drop)
            src.start(queue)
            caps = src.caps  # wait_ready returned True: the first frame's caps are known
            if caps is None:
                raise RuntimeError("the source was ready without its caps")
            video = VideoOut(opts.out, caps["framerate"]) if opts.out else None
            end = classify(opts, runtime, meta, src, queue, video, display, stats, stop)
    except Stalled:
        end = "stall"
        raise
    except KeyboardInterrupt:
        end = "interrupted"
        raise
    finally:
        if queue is not None:
            queue.discard()
        if src is not None:
            decode_cpu = src.close()
        for n, h in handlers.items():
            signal.signal(n, h)
        if video is not None:
            video.close()
        if display is not None:
            display.close()
        result = summary(stats, queue, src, decode_cpu, end, opts)
        if src is not None:
            _report(result, opts)
    return result


def classify(
    opts: StreamOptions,
    runtime: Any,
    meta: dict,
    src: Any,
    queue: FrameQueue,
    video: VideoOut | None,
    display: Display | None,
    stats: Stats,
    stop: threading.Event,
) -> str:
    """The model loop, until the queue ends ("eos"), `stop` is set ("stopped") or
    `--max-frames` is reached ("max_frames"); raises what the reader hit, or Stalled."""
    import torch  # the Runtime takes torch tensors (oipipe.deploy.runtime has imported torch)

    classes = list(meta["classes"])
    k = min(opts.topk, len(classes))
    pre = Preprocess.from_meta(meta)
    transforms = [TRANSFORMS[t] for t in opts.transforms]
    while not stop.is_set():
        batch = queue.get(opts.batch, timeout=0.1)
        if batch is None:
            if queue.error is not None:
                raise queue.error
            return "eos"
        if not batch:
            since = src.waiting_since
            if since is not None and time.perf_counter() - since > opts.stall_timeout:
                n = queue.received
                raise Stalled(
                    f"no frame for {opts.stall_timeout:g} s (--stall-timeout) after {n} "
                    "frame(s): the stream stalled"
                    if n
                    else f"no video from the source within {opts.stall_timeout:g} s "
                    "(--stall-timeout): nothing arrives (is the sender running, the address "
                    "and port right?)"
                )
            continue
        with cpu_and_wall(stats, "preprocess"):
            x = runtime.prepare(torch.from_numpy(np.stack([pre(f.image) for f in batch])))
        with cpu_and_wall(stats, "model"):
            t0 = time.perf_counter()
            y = runtime.call(x)
            runtime.sync()
            model_ms = (time.perf_counter() - t0) * 1000
        stats.model_ms.append(model_ms)
        stats.batches += 1
        with cpu_and_wall(stats, "postprocess"):
            probs = softmax(runtime.logits(y))
            for f, p in zip(batch, probs, strict=True):
                top = [(classes[i], float(p[i])) for i in np.argsort(-p)[:k]]
                img = f.image  # drawn on in place: the model has seen it already
                for t in transforms:
                    img = t(img)
                if display is not None or video is not None:
                    img = annotate(img, top, stats.fps_now(), queue.dropped if queue.drop else None)
                if video is not None:
                    video.write(img)
                if display is not None and not display.show(img):
                    stop.set()
                done = time.perf_counter()
                stats.recent.append(done)
                stats.first_out = done if stats.first_out is None else stats.first_out
                stats.last_out = done
                stats.latency_ms.append((done - f.arrived) * 1000)
                stats.processed += 1
                if opts.json_lines:
                    try:
                        sys.stdout.write(
                            json.dumps(
                                {
                                    "frame": f.seq,
                                    "timestamp": round(f.wall, 6),
                                    "label": top[0][0],
                                    "score": round(top[0][1], 6),
                                    "topk": [[lb, round(sc, 6)] for lb, sc in top],
                                    "latency_ms": round((done - f.arrived) * 1000, 3),
                                    "model_ms": round(model_ms, 3),
                                    "batch": len(batch),
                                }
                            )
                            + "\n"
                        )
                        sys.stdout.flush()
                    except BrokenPipeError:  # `| head`: the reader has gone
                        stop.set()
        if opts.max_frames and stats.processed >= opts.max_frames:
            return "max_frames"
    return "stopped"


def _report(result: dict[str, Any], opts: StreamOptions) -> None:
    log.info(
        "%s: %d frames received, %d processed, %d dropped; %s FPS; latency p50/p99 %s/%s "
        "ms, model p50 %s ms; CPU share decode %s%%, model %s%%",
        result["end"],
        result["frames_received"],
        result["frames_processed"],
        result["frames_dropped"],
        result["fps"],
        result["latency_p50_ms"],
        result["latency_p99_ms"],
        result["model_p50_ms"],
        result["decode_share_pct"],
        result["model_share_pct"],
    )
    if opts.stats is not None:
        from oipipe.core.files import write_json

        write_json(opts.stats, result)
    if opts.mlflow_uri:
        log_to_mlflow(result, opts)


# --- entry point ---------------------------------------------------------------------------------


def mlflow_target(params: Path, uri: str | None, experiment: str | None) -> tuple[str, str]:
    """`--tracking-uri` > MLFLOW_TRACKING_URI > the configured store (`--params`, as the stages
    resolve it); the experiment `--experiment`, else `<tracking.experiment>-stream`."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return uri or os.environ["MLFLOW_TRACKING_URI"], experiment or "oi-pipeline-stream"
    from oipipe.core.config import load_params
    from oipipe.core.tracking import tracking_uri

    cfg = load_params(params)
    return tracking_uri(cfg), experiment or f"{cfg.tracking.experiment}-stream"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oitools.stream",
        description="Classify a live video stream with an artifact of the pipeline.",
    )
    p.add_argument(
        "source",
        help="a GStreamer pipeline (quoted), a video file, a camera "
        "(/dev/video0 or 0) or an rtsp:// or http(s):// URL",
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        help="an artifact: model.onnx/.ts/.pt2, an optimized variant's folder, or the "
        "train stage's model.pt",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="auto (OpenCV's GStreamer backend when it has one), gst-launch or opencv",
    )
    p.add_argument("--batch", type=int, default=1, help="frames per model call, at most")
    p.add_argument(
        "--drop", default="auto", help="drop stale frames: auto (when the source is live), yes, no"
    )
    p.add_argument("--topk", type=int, default=3)
    p.add_argument(
        "--transform",
        action="append",
        default=[],
        metavar="NAME",
        help=f"before display/output, in order: {', '.join(TRANSFORMS)}",
    )
    p.add_argument("--display", action="store_true", help="show a window (q or Esc stops)")
    p.add_argument(
        "--out", type=Path, help="annotated video file (.avi MJPG, .mp4 MPEG-4, .mkv FFV1 lossless)"
    )
    p.add_argument(
        "--json", action="store_true", dest="json_lines", help="one JSON line per frame on stdout"
    )
    p.add_argument("--stats", type=Path, help="write the summary as JSON")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=10.0,
        help="seconds without a frame before giving up (default 10)",
    )
    p.add_argument("--max-frames", type=int, default=0, help="stop after N processed frames")
    p.add_argument("--mlflow", action="store_true", help="log the summary to MLflow")
    p.add_argument(
        "--tracking-uri",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the configured one in --params)",
    )
    p.add_argument("--experiment", help="MLflow experiment (default: <tracking.experiment>-stream)")
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="composed config for the MLflow store (default ./params.yaml)",
    )
    args = p.parse_args(argv)

    def work() -> None:
        opts = StreamOptions(
            source=args.source,
            model=args.model,
            backend=args.backend,
            batch=args.batch,
            drop=args.drop,
            topk=args.topk,
            transforms=args.transform,
            display=args.display,
            out=args.out,
            json_lines=args.json_lines,
            stats=args.stats,
            stall_timeout=args.stall_timeout,
            max_frames=args.max_frames,
        )
        if args.mlflow:
            opts.mlflow_uri, opts.mlflow_experiment = mlflow_target(
                args.params, args.tracking_uri, args.experiment
            )
        run(opts)

    return cli.guarded("stream", work, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
