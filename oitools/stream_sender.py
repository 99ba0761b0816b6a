"""The stream client's sender: a camera, a test pattern or a video file as RTP/H.264 over UDP.

    python -m oitools.stream_sender [--source auto|camera|test|FILE] [--host 127.0.0.1]
        [--port 5000] [--device /dev/video0] [--width 640] [--height 480] [--fps 30]
        [--bitrate 2000] [--num-buffers N] [--pattern smpte] [--dry-run]

`auto` (the default) streams the camera at `--device` when there is one, else GStreamer's test
pattern. The pipeline (README, "Live inference on a GStreamer stream", explains each part):

    SOURCE ! videoconvert ! videoscale ! videorate        (SOURCE: v4l2src ! decodebin, ...)
        ! video/x-raw,format=I420,width=W,height=H,framerate=F/1
        ! x264enc tune=zerolatency speed-preset=ultrafast bitrate=KBPS key-int-max=F
        ! video/x-h264,profile=baseline
        ! rtph264pay config-interval=1 pt=96 ! udpsink host=HOST port=PORT

It replaces itself with `gst-launch-1.0` (exec): Ctrl-C and SIGTERM reach GStreamer directly,
the exit code is gst-launch's own, and nothing is left running. Standard library only, so it
runs as `python3 oitools/stream_sender.py` on a camera box that has GStreamer and nothing of this
project. Exit code 2 for a bad request (no camera, no such file, GStreamer not installed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

GST_PACKAGES = (
    "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)


class UsageError(ValueError):
    """A request that cannot be served: exit code 2, the message says why."""


def source_elements(args: argparse.Namespace) -> tuple[list[str], str]:
    """The elements that produce raw video, and what they are (camera, test, file)."""
    source = args.source
    if source == "auto":
        source = "camera" if Path(args.device).exists() else "test"
        if source == "test":
            print(
                f"stream_server: no camera at {args.device}: streaming the test pattern",
                file=sys.stderr,
            )
    if source == "camera":
        if not Path(args.device).exists():
            raise UsageError(
                f"no camera at {args.device} (`v4l2-ctl --list-devices` lists "
                "them; --source test streams a test pattern)"
            )
        # decodebin: raw frames pass straight through, an MJPEG-only webcam's get decoded
        return ["v4l2src", f"device={args.device}", "!", "decodebin"], "camera"
    buffers = [f"num-buffers={args.num_buffers}"] if args.num_buffers > 0 else []
    if source == "test":
        return ["videotestsrc", "is-live=true", f"pattern={args.pattern}", *buffers], "test"
    file = Path(source)
    if not file.is_file():
        raise UsageError(f"{source}: no such file (--source is auto, camera, test or a file)")
    # a file is decoded as fast as it can be; udpsink's clock sync paces it at its own rate
    return ["filesrc", f"location={file.resolve()}", "!", "decodebin"], "file"


def pipeline(args: argparse.Namespace) -> tuple[list[str], str]:
    src, kind = source_elements(args)
    raw = f"video/x-raw,format=I420,width={args.width},height={args.height},framerate={args.fps}/1"
    return [
        *src,
        "!",
        "videoconvert",
        "!",
        "videoscale",
        "!",
        "videorate",
        "!",
        raw,
        "!",
        "x264enc",
        "tune=zerolatency",
        "speed-preset=ultrafast",
        f"bitrate={args.bitrate}",
        f"key-int-max={args.fps}",
        "!",
        "video/x-h264,profile=baseline",
        "!",
        "rtph264pay",
        "config-interval=1",
        "pt=96",
        "!",
        "udpsink",
        f"host={args.host}",
        f"port={args.port}",
    ], kind


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m oitools.stream_sender",
        description="Stream a camera, a test pattern or a video file as RTP/H.264 over UDP.",
    )
    p.add_argument(
        "--source",
        default="auto",
        help="auto (camera if present, else test), camera, test, or a video file",
    )
    p.add_argument("--host", default="127.0.0.1", help="receiver's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="receiver's UDP port (default 5000)")
    p.add_argument("--device", default="/dev/video0", help="camera device (default /dev/video0)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--bitrate", type=int, default=2000, help="H.264 kbit/s (default 2000)")
    p.add_argument(
        "--num-buffers",
        type=int,
        default=0,
        help="test pattern: stop after N frames (default 0: never)",
    )
    p.add_argument("--pattern", default="smpte", help="videotestsrc pattern (default smpte)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = p.parse_args(argv)
    try:
        if (
            min(args.width, args.height, args.fps, args.bitrate) < 1
            or args.width % 2
            or args.height % 2
            or not 0 < args.port < 65536
        ):
            raise UsageError(
                "--width and --height even and positive (I420 halves them), "
                "--fps and --bitrate positive, --port in 1..65535"
            )
        tokens, kind = pipeline(args)
        exe = shutil.which("gst-launch-1.0")
        if exe is None and not args.dry_run:
            raise UsageError(
                f"gst-launch-1.0 not found on PATH: install GStreamer (Debian: "
                f"apt-get install {GST_PACKAGES})"
            )
    except UsageError as e:
        print(f"stream_server: {e}", file=sys.stderr)
        return 2
    cmd = [exe or "gst-launch-1.0", "-e", *tokens]
    shown = " ".join(t if t == "!" else shlex.quote(t) for t in cmd)
    print(
        f"stream_server: {kind} -> rtp://{args.host}:{args.port}: {shown}",
        file=sys.stderr,
        flush=True,
    )
    if args.dry_run:
        print(shown)
        return 0
    os.execv(cmd[0], cmd)  # does not return


if __name__ == "__main__":
    sys.exit(main())
