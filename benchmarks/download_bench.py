"""Download throughput at 1 vs 16 workers against a 50 ms-latency mirror, and the peak memory of
the metadata filter on a train label file of the real size (376,764,810 bytes).

    python benchmarks/download_bench.py [--images-per-class 40] [--latency 0.05] [--out FILE]

Targets (issue 2): >= 8x images/s at 16 workers vs 1; filter peak RSS < 400 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from oimirror import generate
from oipipe.core.config import compose
from oipipe.data.openimages import LABEL_FILES
from stages import download

REAL_TRAIN_LABELS_BYTES = 376_764_810


@contextlib.contextmanager
def served(mirror: Path, latency: float) -> Iterator[str]:
    """The mirror in its own process, as a remote server would be: an in-process server would
    share this process's GIL with the download threads and cap the measured concurrency."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oimirror",
            "serve",
            str(mirror),
            "--port",
            str(port),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(base + "openimages/manifest-probe", timeout=1):
                    pass
            except urllib.error.HTTPError:
                break  # a 404 means it is answering
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait()


def throughput(mirror: Path, root: Path, latency: float, workers: int) -> dict:
    with served(mirror, latency) as base:
        cfg = compose(
            [
                f"paths.root={root}",
                "tracking.enabled=false",
                "data=mirror",
                f"data.metadata_url={base}openimages/",
                f"data.images_url={base}open-images-dataset/",
                f"runtime.fetch.workers={workers}",
            ]
        )
        # the metadata CSVs are cached by a first run, so only image fetching is timed
        shutil.rmtree(download.cache_dir(cfg, "images", cfg.data.images_url), ignore_errors=True)
        t0 = time.perf_counter()
        metrics = download.run(cfg)
        stage_s = time.perf_counter() - t0
    # images/s of the fetch phase (the pool); the whole stage's time is reported beside it
    return {
        "workers": workers,
        "images": metrics["images_requested"],
        "fetch_seconds": metrics["fetch_seconds"],
        "images_per_s": metrics["fetch_images_per_s"],
        "stage_seconds": round(stage_s, 3),
    }


def filter_peak_rss(label_file: Path, label: str) -> dict:
    """Run the streaming filter in a fresh process; its peak RSS is the figure."""
    # VmHWM (peak resident set) is per address space, so unlike ru_maxrss it does not inherit
    # the parent's peak across fork+exec.
    code = (
        "import pathlib, re, time\n"
        "from oipipe.data.openimages import scan_labels\n"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "base = hwm()\n"
        "t = time.perf_counter()\n"
        f"s = scan_labels(pathlib.Path({str(label_file)!r}), [{label!r}])\n"
        "dt = time.perf_counter() - t\n"
        "print(base, hwm(), s.rows, len(s.positives), dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak, rows, positives, dt = out.stdout.split()
    return {
        "file_bytes": label_file.stat().st_size,
        "rows": int(rows),
        "positives": int(positives),
        "seconds": round(float(dt), 2),
        "rss_before_mb": round(int(base) / 1024, 1),
        "peak_rss_mb": round(int(peak) / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images-per-class", type=int, default=40)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mirror = tmp / "mirror"
        generate(mirror, images_per_class=args.images_per_class)
        root = tmp / "run"
        throughput(mirror, root, 0.0, 16)  # warm the metadata cache
        one = throughput(mirror, root, args.latency, 1)
        many = throughput(mirror, root, args.latency, 16)
        big = tmp / "big"
        t0 = time.perf_counter()
        manifest = generate(big, images_per_class=3, label_pad_bytes=REAL_TRAIN_LABELS_BYTES)
        print(f"377 MB label file generated in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        label = next(iter(manifest["classes"].values()))
        mem = filter_peak_rss(big / "openimages" / LABEL_FILES["train"], label)
    result = {
        "latency_s": args.latency,
        "workers_1": one,
        "workers_16": many,
        "speedup_16_vs_1": round(many["images_per_s"] / one["images_per_s"], 2),
        "label_filter": mem,
        "this_process_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
