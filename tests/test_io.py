"""Atomic writes (core.files): a writer that fails, or a process killed while it writes, never
leaves a partial file under the final name; the previous file stays whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from oipipe.core.config import PROJECT_ROOT
from oipipe.core.files import atomic_dir, atomic_open, remove_stale_temps, write_csv, write_text

OLD = "ImageID,split\nold,train\n"


def test_an_error_inside_the_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "raw" / "labels.csv"
    write_text(target, OLD)
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_open(target) as f:
        f.write("ImageID,split\nnew,")
        f.flush()  # the bytes are on disk, just not under the final name
        raise RuntimeError("disk on fire")
    assert target.read_text() == OLD

    def rows():  # a stage's rows, failing halfway (a bad record, a KeyError)
        yield ("new", "train")
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        write_csv(target, ["ImageID", "split"], rows())
    assert target.read_text() == OLD
    assert sorted(os.listdir(target.parent)) == ["labels.csv"], "a temp file was left behind"


def test_an_error_while_building_a_folder_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    with atomic_dir(out) as d:
        write_text(d / "labels.csv", OLD)
    with pytest.raises(RuntimeError, match="interrupted"), atomic_dir(out) as d:
        write_text(d / "labels.csv", "ImageID,split\nnew,train\n")
        (d / "images").mkdir()
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(out)) == ["labels.csv"] and (out / "labels.csv").read_text() == OLD
    assert sorted(os.listdir(tmp_path)) == ["raw"], "a temp folder was left behind"


# Writes a CSV of 1 KiB rows through core.files, slowly: it says "writing" on stdout once 1 MiB
# has gone to the file (all but the last 8 KiB buffer of it is on disk), then goes on at
# 100 rows a second, for minutes unless it is killed.
SLOW_WRITER = """
import sys, time
from pathlib import Path
from oipipe.core.files import write_csv

def rows():
    for i in range(100_000):
        if i == 1024:
            print("writing", flush=True)
        if i >= 1024:
            time.sleep(0.01)
        yield (i, "x" * 1016)

write_csv(Path(sys.argv[1]), ["i", "payload"], rows())
"""


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "raw" / "labels.csv"
    write_text(target, OLD)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(target)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until the writer is 1 MiB in
        assert line == "writing\n", f"the writer did not start: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    assert target.read_text() == OLD, "a partial file was left under the final name"
    # the partial bytes are in a temp file beside it, which the next run of a stage removes
    (temp,) = [p for p in target.parent.iterdir() if p != target]
    assert temp.name.startswith(".labels.csv.") and temp.stat().st_size > 1 << 19
    assert remove_stale_temps(target.parent) == 1
    assert sorted(os.listdir(target.parent)) == ["labels.csv"]


# Replaces a folder built by atomic_dir, dying (os._exit: no except, no finally, as SIGKILL) right
# after its Nth step, a step being any os.replace or the one-step exchange. argv[3] "rename"
# stands for a kernel or file system without renameat2's RENAME_EXCHANGE.
DYING_SWAP = """
import os, sys
from pathlib import Path
import oipipe.core.files as io

target, die_after, swap = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if swap == "rename":
    io._exchange = lambda a, b: False
steps = 0

def step(fn):
    def run(*args):
        global steps
        result = fn(*args)
        steps += 1
        if steps == die_after:
            os._exit(9)
        return result
    return run

os.replace = step(os.replace)
io._exchange = step(io._exchange)
with io.atomic_dir(target) as d:
    io.write_text(d / "labels.csv", "new")
    (d / "images").mkdir()
    io.write_bytes(d / "images" / "b.jpg", b"new image")
print(steps)
"""


def tree(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` with its bytes; None if there is no such folder."""
    if not folder.is_dir():
        return None
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("swap", ["exchange", "rename"])
def test_a_process_killed_at_any_step_of_a_folder_swap_loses_nothing(
    tmp_path: Path, swap: str
) -> None:
    old = {"labels.csv": b"old", "images/a.jpg": b"old image"}
    new = {"labels.csv": b"new", "images/b.jpg": b"new image"}
    work, out = tmp_path / "work", tmp_path / "work" / "raw"

    def previous_output() -> None:  # laid out by hand, independently of the code under test
        shutil.rmtree(work, ignore_errors=True)
        (out / "images").mkdir(parents=True)
        for name, data in old.items():
            (out / name).write_bytes(data)

    def swap_dying_after(n: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", DYING_SWAP, str(out), str(n), swap],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    previous_output()
    full = swap_dying_after(0)
    assert full.returncode == 0, full.stderr
    assert tree(out) == new and os.listdir(work) == ["raw"]
    steps = int(full.stdout)
    assert steps >= 4  # two file writes, then the swap's own steps
    gaps = 0
    for n in range(1, steps + 1):
        previous_output()
        killed = swap_dying_after(n)
        assert killed.returncode == 9, killed.stderr
        now = tree(out)
        if now is None:
            gaps += 1
            assert swap == "rename", f"killed after step {n}: no folder under the final name"
        else:
            assert now in (old, new), f"killed after step {n}: a mixed folder {sorted(now)}"
        # the next run of the stage first puts the previous output back, before it builds
        # anything; and a rerun that fails leaves it there
        expected = old if now is None else now
        with pytest.raises(RuntimeError, match="rerun failed"), atomic_dir(out):
            assert tree(out) == expected, f"killed after step {n}: not restored on entry"
            raise RuntimeError("rerun failed")
        assert tree(out) == expected, f"killed after step {n}"
        assert not (work / ".raw.old").exists()
    # the rename fallback has a moment with no folder under the final name; exchange has none
    assert (gaps > 0) == (swap == "rename")
