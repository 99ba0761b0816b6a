"""`python -m oimirror`: generate a mirror folder, or serve one on 127.0.0.1.

  generate OUT                         synthetic images of --classes, faults baked in
  generate OUT --from-folders PHOTOS   real photos, PHOTOS/<class>/<image>.jpg
  serve ROOT --port N                  serve a generated folder until Ctrl-C or SIGTERM

Point the pipeline at a served mirror with data.metadata_url=http://127.0.0.1:N/openimages/ and
data.images_url=http://127.0.0.1:N/open-images-dataset/ (conf/data/mirror.yaml holds them).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oimirror.folders import generate_from_folders
from oimirror.generate import DEFAULT_CLASSES, generate
from oimirror.layout import IMAGES_DIR, MANIFEST, METADATA_DIR
from oimirror.serve import MirrorServer

PROG = "python -m oimirror"


class UsageError(Exception):
    """A bad argument or input: one line on stderr, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a mirror into OUT")
    gen.add_argument("out", type=Path)
    gen.add_argument(
        "--from-folders",
        type=Path,
        metavar="PHOTOS",
        help="lay out real photos, PHOTOS/<class>/<image>.jpg, each folder named "
        "after an Open Images class, instead of synthetic images",
    )
    gen.add_argument(
        "--classes",
        nargs="+",
        help="display names, e.g. Zebra 'Sea turtle' (default: "
        f"{' '.join(DEFAULT_CLASSES)}); with --from-folders, the folders to use "
        "(default: all)",
    )
    gen.add_argument(
        "--images-per-class",
        type=int,
        help="downloadable images per class (default: 12; with --from-folders, "
        "at most this many photos per class, default all)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--truncated",
        type=int,
        default=0,
        help="add this many train JPEGs stored cut short (a fault only a full check catches)",
    )
    gen.add_argument(
        "--label-pad-bytes",
        type=int,
        default=0,
        help="pad the train label file to at least this many bytes",
    )
    srv = sub.add_parser("serve", help="serve a generated mirror until Ctrl-C or SIGTERM")
    srv.add_argument("root", type=Path)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    srv.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    args = parser.parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _serve(args)
    except (UsageError, ValueError, FileExistsError) as exc:
        # ValueError includes oipipe.core.errors.InputError: an unknown class, an empty folder.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.from_folders is None:
        manifest = generate(
            args.out,
            classes=args.classes or DEFAULT_CLASSES,
            images_per_class=12 if args.images_per_class is None else args.images_per_class,
            seed=args.seed,
            label_pad_bytes=args.label_pad_bytes,
            truncated=args.truncated,
        )
        n = sum(len(v) for v in manifest["downloadable"].values())
        print(
            f"wrote {args.out} in {time.perf_counter() - started:.1f}s: {n} downloadable "
            f"images, {len(manifest['missing'])} missing, {len(manifest['not_jpeg'])} not "
            f"JPEG, {len(manifest['truncated'])} truncated, "
            f"{len(manifest['multi_class'])} multi-class; manifest {args.out / MANIFEST}"
        )
        return 0
    for flag, value in (
        ("--truncated", args.truncated),
        ("--label-pad-bytes", args.label_pad_bytes),
    ):
        if value:
            raise UsageError(
                f"{flag} adds faults to the synthetic mirror only; drop it or --from-folders"
            )
    manifest = generate_from_folders(
        args.out,
        args.from_folders,
        classes=args.classes,
        images_per_class=args.images_per_class,
        seed=args.seed,
    )
    counts = ", ".join(f"{c} {len(v)}" for c, v in manifest["downloadable"].items())
    n = sum(len(v) for v in manifest["downloadable"].values())
    skipped = len(manifest["skipped"])
    why = f" ({_reasons(manifest)}, listed in the manifest)" if skipped else ""
    print(
        f"wrote {args.out} in {time.perf_counter() - started:.1f}s: {n} photos ({counts}), "
        f"{skipped} skipped{why}; manifest {args.out / MANIFEST}"
    )
    return 0


def _reasons(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{n} {k}" for k, n in manifest["skip_reasons"].items())


def _serve(args: argparse.Namespace) -> int:
    if not (args.root / METADATA_DIR).is_dir() or not (args.root / IMAGES_DIR).is_dir():
        raise UsageError(
            f"{args.root} has no {METADATA_DIR}/ and {IMAGES_DIR}/: run "
            f"'{PROG} generate {args.root}' first"
        )
    try:
        server = MirrorServer(args.root, latency=args.latency, host=args.host, port=args.port)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); pick another --port"
        ) from None
    # Ctrl-C and SIGTERM (`kill`, `make offline`'s trap) both stop it cleanly. SIGINT's handler is
    # set explicitly: a process started in the background by a shell or under a parent that
    # ignores SIGINT inherits the ignore, and would never stop on Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with server:
        print(f"metadata base: {server.metadata_url}")
        print(f"images base:   {server.images_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
