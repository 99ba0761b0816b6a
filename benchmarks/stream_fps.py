"""The stream client's speed: end-to-end FPS, decode against model time, dropped frames.

    python benchmarks/stream_fps.py [--model artifacts/exported/model.onnx] [--seconds 20]
        [--batch 1 4] [--inputs testsrc h264 h264-unpaced]
        [--out benchmarks/results/stream_fps.json]

640x480 video at 30 FPS goes through the real client (`python -m oitools.stream`, a fresh process
per row; its figures are the summary it writes with --stats):

- `testsrc`: `videotestsrc is-live=true` (a live source: raw frames made at 30 FPS, so "decode"
  is making and converting them; `--drop auto` drops frames the model cannot keep up with);
- `h264`: a 640x480 30 FPS H.264 file (made here once with x264enc), demuxed, decoded by
  avdec_h264 and paced at its own rate by `identity sync=true`, as a network stream would be;
  `--drop yes`;
- `h264-unpaced`: the same file unpaced and nothing dropped: as fast as decoder and model go
  together, the client's capacity on this machine.

One row per (input, batch size), kept whatever happens: status, error, the input, and the
client's summary: frames received, processed and dropped, FPS out, latency percentiles (from the
whole frame read to its output), model-call percentiles, and the CPU seconds and shares of
decoding (the GStreamer child), preprocessing, the model and drawing/output. The client writes
no video and shows nothing here: those cost what the disk and screen cost, not the model.
Run it on a quiet machine: the decoder and the model share the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oipipe.core.files import write_json  # noqa: E402
from oipipe.measure.machine import machine_info  # noqa: E402

WIDTH, HEIGHT, FPS = 640, 480, 30
INPUTS = ("testsrc", "h264", "h264-unpaced")


def h264_file(folder: Path, frames: int) -> Path:
    f = folder / f"testsrc_{WIDTH}x{HEIGHT}_{FPS}fps_{frames}.mp4"
    if not f.exists():
        subprocess.run(
            [
                "gst-launch-1.0",
                "-q",
                "videotestsrc",
                f"num-buffers={frames}",
                "pattern=ball",
                "!",
                f"video/x-raw,width={WIDTH},height={HEIGHT},framerate={FPS}/1",
                "!",
                "x264enc",
                "speed-preset=ultrafast",
                "tune=zerolatency",
                f"key-int-max={FPS}",
                "!",
                "h264parse",
                "!",
                "mp4mux",
                "!",
                "filesink",
                f"location={f}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return f


def source(kind: str, frames: int, folder: Path) -> tuple[str, list[str]]:
    """The client's SOURCE and extra options for one input."""
    if kind == "testsrc":
        return (
            f"videotestsrc is-live=true num-buffers={frames} pattern=ball ! "
            f"video/x-raw,width={WIDTH},height={HEIGHT},framerate={FPS}/1",
            [],
        )
    if kind in ("h264", "h264-unpaced"):
        f = h264_file(folder, frames)
        decode = f"filesrc location={f} ! qtdemux ! h264parse ! avdec_h264"
        if kind == "h264-unpaced":  # as fast as decoder and model go: the client's capacity
            return decode, ["--drop", "no"]
        return f"{decode} ! identity sync=true", ["--drop", "yes"]
    raise ValueError(f"unknown input {kind!r}; expected one of {sorted(INPUTS)}")


def measure(model: Path, kind: str, batch: int, frames: int, folder: Path) -> dict:
    row: dict = {
        "input": kind,
        "batch": batch,
        "width": WIDTH,
        "height": HEIGHT,
        "input_fps": FPS,
        "frames_sent": frames,
        "status": "ok",
        "error": None,
    }
    stats = folder / f"stats_{kind}_{batch}.json"
    try:
        src, extra = source(kind, frames, folder)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "oitools.stream",
                src,
                "--model",
                str(model),
                "--batch",
                str(batch),
                "--stats",
                str(stats),
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120 + 3 * frames / FPS,
        )
        if res.returncode != 0:
            row.update(status="failed", error=res.stderr.strip().splitlines()[-1:])
        if stats.exists():
            row.update({k: v for k, v in json.loads(stats.read_text()).items() if k not in row})
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    print(
        json.dumps(
            {
                k: row.get(k)
                for k in (
                    "input",
                    "batch",
                    "status",
                    "fps",
                    "frames_received",
                    "frames_dropped",
                    "decode_share",
                    "model_share",
                    "error",
                )
            }
        ),
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "exported" / "model.onnx")
    p.add_argument("--seconds", type=float, default=20.0, help="stream length per row")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_fps.json")
    args = p.parse_args()
    frames = max(1, round(args.seconds * FPS))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="stream_fps_") as tmp:
        rows = [
            measure(args.model, kind, b, frames, Path(tmp))
            for kind in args.inputs
            for b in args.batch
        ]
    write_json(
        args.out,
        {
            "model": str(args.model),
            "seconds": args.seconds,
            "machine": machine_info(),
            "wall_s": round(time.time() - t0, 1),
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
