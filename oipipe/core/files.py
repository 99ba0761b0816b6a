"""Atomic file output: a killed stage never leaves a half-written file under a final name."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("oipipe.core.files")


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and `os.replace` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Put `folder`'s entries on disk: a rename survives a power cut only once its folder is
    synced (fsyncing the file makes its bytes durable, not its new name)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name, then swap it into place whole.

    The final name holds a whole folder at every moment, the previous one or the new one. On
    Linux the two are exchanged in one step (renameat2 RENAME_EXCHANGE). Where that is missing
    (another OS, a file system without it) the previous folder is first moved aside to
    `.<name>.old`; a process killed before the new one takes its place leaves only that, and
    the next `atomic_dir` on the path (the stage's rerun) moves it back before anything else.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    _restore_previous(path, old)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        _sync_tree(tmp)  # the new files are on disk before any of them has a final name
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            os.replace(tmp, old)  # the previous folder, under the one name a rerun clears
        else:
            os.replace(path, old)
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _restore_previous(path, old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _restore_previous(path: Path, old: Path) -> None:
    """Undo a swap cut short: `.<name>.old` without `<name>` is the previous output, whole."""
    if not old.exists():
        return
    if path.exists():  # the swap finished; only the clean-up was cut short
        shutil.rmtree(old)
        return
    log.warning(
        "%s: restoring the previous output from %s (a run was killed mid-swap)", path, old.name
    )
    os.replace(old, path)
    fsync_dir(path.parent)


# <linux/fs.h> and <fcntl.h>; errnos meaning "this kernel or file system cannot exchange"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _libc_call(name: str) -> Callable[..., int] | None:
    """A libc function by name, or None where this C library lacks it (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the kernel or file system cannot."""
    renameat2 = _libc_call("renameat2")
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _sync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk. syncfs flushes the whole file system in
    one call, far cheaper than one fsync per file for thousands of images; elsewhere, or if it
    fails, each file and folder is fsynced."""
    syncfs = _libc_call("syncfs")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs is not None and syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for folder, _, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):  # its target lives elsewhere, outside this output
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files a killed run left (`.name.*.tmp`); returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


@contextlib.contextmanager
def file_lock(file: Path) -> Iterator[float]:
    """Hold an exclusive `flock` on `file` (created if missing); yields the seconds waited.

    The one lock of the project (the MLflow store's creation, a cached download, the sweep's
    shared data and benchmark). `flock` works across processes on one machine and, on Linux, on
    NFS (emulated with POSIX locks), which is where a SLURM sweep folder lives. The lock dies
    with its process, so a killed job never leaves it held.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - started
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
