"""Stage `download` against a real HTTP mirror on 127.0.0.1, with faults."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import stage_cmd, write_params
from PIL import Image

from oimirror import MirrorServer, generate
from oipipe.core import cli
from oipipe.core.config import PROJECT_ROOT, path
from oipipe.core.errors import InputError
from oipipe.core.files import read_csv
from oipipe.data.fetch import Fetcher, FetchError
from oipipe.data.openimages import IMAGE_ID_FILES, LABEL_FILES, scan_labels
from stages import download


def image_path(split: str, iid: str) -> str:
    return f"open-images-dataset/{split}/{iid}.jpg"


def downloadable(manifest: dict) -> dict[str, tuple[str, str]]:
    return {
        e["id"]: (e["split"], name)
        for name, items in manifest["downloadable"].items()
        for e in items
    }


def test_end_to_end_with_faults(make_cfg, mirror, manifest) -> None:
    expected = downloadable(manifest)
    some = sorted(expected)[:6]
    for iid in some[:3]:
        mirror.fail_first(image_path(expected[iid][0], iid), times=2, status=503)
    for iid in some[3:5]:
        mirror.truncate(image_path(expected[iid][0], iid), keep=0.4)
    mirror.fail_first(image_path(expected[some[5]][0], some[5]), status=429)
    cfg = make_cfg(srv=mirror)

    metrics = download.run(cfg)

    raw = path(cfg, "raw")
    labels = {r["ImageID"]: (r["split"], r["class"]) for r in read_csv(raw / "labels.csv")}
    assert labels == expected
    assert metrics["downloaded"] == len(expected) == 30
    assert metrics["missing"] == len(manifest["missing"]) == 3
    assert metrics["invalid"] == len(manifest["not_jpeg"]) == 1
    assert metrics["failed"] == 0
    assert metrics["multiclass_dropped"] == len(manifest["multi_class"])
    assert metrics["malformed_rows"] == 1
    assert metrics["http_retries"] >= 3 * 2 + 2 + 1
    # every fault was retried until the image arrived whole, and each arrived image decodes
    for iid, (split, _) in expected.items():
        f = raw / "images" / split / f"{iid}.jpg"
        with Image.open(f) as im:
            im.load()
    assert len(list((raw / "images").rglob("*.jpg"))) == len(expected)
    missing = {r["ImageID"]: r["reason"] for r in read_csv(raw / "missing.csv")}
    assert {e["id"] for e in manifest["missing"]} | {e["id"] for e in manifest["not_jpeg"]} == set(
        missing
    )
    assert all(missing[e["id"]].startswith("missing: ") for e in manifest["missing"])
    # attribution comes from the image-ID CSVs, whose authors and titles contain commas/quotes
    truth = {}
    for rel in IMAGE_ID_FILES.values():
        with open(mirror.root / "openimages" / rel, newline="") as f:
            truth.update({r["ImageID"]: r for r in csv.DictReader(f)})
    attribution = read_csv(raw / "attribution.csv")
    assert len(attribution) == len(expected)
    for row in attribution:
        for key in ("Author", "Title", "License", "OriginalURL"):
            assert row[key] == truth[row["ImageID"]][key]
    assert any("," in r["Author"] for r in attribution)
    # the statistics: printed table rows add up, and the DVC metrics file holds the same
    on_disk = json.loads((path(cfg, "metrics") / "download.json").read_text())
    assert on_disk == metrics
    assert metrics["all.images"] == sum(
        metrics[f"{s}.images"] for s in ("train", "validation", "test")
    )
    assert metrics["all.Zebra.count"] == 10
    assert metrics["all.Zebra.share_pct"] == pytest.approx(100 / 3, abs=1e-2)


def test_rerun_and_new_classes_fetch_only_what_is_not_cached(make_cfg, mirror, manifest) -> None:
    def carrying(name: str) -> set[str]:
        # alone among the requested classes, a multi-class image is a single-class one
        return (
            {e["id"] for e in manifest["downloadable"][name]}
            | {e["id"] for e in manifest["multi_class"] if name in e["classes"]}
            | {e["id"] for e in manifest["missing"] + manifest["not_jpeg"] if e["class"] == name}
        )

    download.run(make_cfg("data.classes=[Zebra]", srv=mirror))
    assert {Path(p).stem for p in mirror.requests if p.endswith(".jpg")} == carrying("Zebra")
    mirror.reset_counts()
    download.run(make_cfg("data.classes=[Zebra]", srv=mirror))
    # a rerun fetches nothing but what failed last time (the 404 and the non-JPEG body)
    assert not any(p.endswith(".csv") for p in mirror.requests)
    failed = {e["id"] for e in manifest["missing"] + manifest["not_jpeg"] if e["class"] == "Zebra"}
    assert {Path(p).stem for p in mirror.requests} == failed
    mirror.reset_counts()
    download.run(make_cfg("data.classes=[Zebra, Blue jay]", srv=mirror))
    # the metadata CSVs are cached: none is fetched again when the classes change
    assert not any(p.endswith(".csv") for p in mirror.requests)
    assert {Path(p).stem for p in mirror.requests} == (
        carrying("Blue jay") - carrying("Zebra")
    ) | failed


def test_cap_and_sampling_are_deterministic_per_seed(make_cfg, mirror, manifest) -> None:
    def pick(seed: int) -> set[str]:
        cfg = make_cfg("data.max_images_per_class=4", f"data.seed={seed}", srv=mirror)
        metrics = download.run(cfg)
        raw = path(cfg, "raw")
        kept = {r["ImageID"]: r["class"] for r in read_csv(raw / "labels.csv")}
        lost = {r["ImageID"]: r["class"] for r in read_csv(raw / "missing.csv")}
        # every class has more than 4 candidates, so the cap picks exactly 4 of each; the ones
        # the mirror lacks or serves broken are picked like any other and listed as lost
        assert metrics["selected"] == 3 * 4
        assert Counter([*kept.values(), *lost.values()]) == dict.fromkeys(manifest["classes"], 4)
        assert metrics["downloaded"] == len(kept)
        return set(kept) | set(lost)

    a, b, c = pick(0), pick(0), pick(1)
    assert a == b
    assert a != c


def test_jpeg_cut_short_with_a_matching_content_length_is_invalid(make_cfg, tmp_path) -> None:
    # The server sends these files whole (they are cut on disk), so the transfer looks complete:
    # only a check of the JPEG itself, to its end, can reject them.
    manifest = generate(tmp_path / "mirror", images_per_class=3, seed=2, truncated=3)
    cut = {e["id"]: e for e in manifest["truncated"]}
    assert {e["class"] for e in cut.values()} == set(manifest["classes"])
    with MirrorServer(tmp_path / "mirror") as srv:
        cfg = make_cfg(srv=srv)
        metrics = download.run(cfg)
        # each was fetched once: a complete transfer, not a network fault worth a retry
        assert all(srv.requests[image_path(e["split"], iid)] == 1 for iid, e in cut.items())
    assert metrics["invalid"] == len(cut) + len(manifest["not_jpeg"]) == 4
    assert metrics["downloaded"] == 3 * 3 and metrics["failed"] == 0
    raw = path(cfg, "raw")
    missing = {r["ImageID"]: r["reason"] for r in read_csv(raw / "missing.csv")}
    for iid in cut:
        assert missing[iid].startswith("invalid: "), missing[iid]
    assert not cut.keys() & {r["ImageID"] for r in read_csv(raw / "labels.csv")}
    cache = download.cache_dir(cfg, "images", cfg.data.images_url)
    assert not [p for p in cache.rglob("*") if p.stem in cut], "a cut JPEG reached the cache"


def test_an_image_over_max_image_mb_is_invalid_and_never_written(
    make_cfg, private_mirror, manifest
) -> None:
    # a real JPEG that decodes, just too big: only the size cap can reject it
    big = manifest["downloadable"]["Zebra"][0]
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(private_mirror / image_path(big["split"], big["id"]), quality=95)
    assert (private_mirror / image_path(big["split"], big["id"])).stat().st_size > 100_000
    with MirrorServer(private_mirror) as srv:
        cfg = make_cfg("runtime.fetch.max_image_mb=0.05", srv=srv)  # 52 KB; the others are ~10
        metrics = download.run(cfg)
        assert srv.requests[image_path(big["split"], big["id"])] == 1  # refused, not retried
    assert metrics["invalid"] == len(manifest["not_jpeg"]) + 1
    assert metrics["downloaded"] == len(downloadable(manifest)) - 1 and metrics["failed"] == 0
    missing = {r["ImageID"]: r["reason"] for r in read_csv(path(cfg, "raw") / "missing.csv")}
    assert missing[big["id"]].startswith("invalid: ") and "max_image_mb" in missing[big["id"]]
    cache = download.cache_dir(cfg, "images", cfg.data.images_url)
    assert not [p for p in cache.rglob("*") if p.stem == big["id"]], "it reached the cache"
    assert not list(path(cfg, "raw").rglob(f"{big['id']}*"))


def test_multiclass_policy_first_assigns_the_first_requested_class(
    make_cfg, mirror, manifest
) -> None:
    cfg = make_cfg("data.multiclass_policy=first", srv=mirror)
    metrics = download.run(cfg)
    labels = {r["ImageID"]: r["class"] for r in read_csv(path(cfg, "raw") / "labels.csv")}
    order = list(manifest["classes"])
    for e in manifest["multi_class"]:
        assert labels[e["id"]] == min(e["classes"], key=order.index)
    assert metrics["multiclass_dropped"] == 0


def test_metadata_download_resumes_with_http_range(make_cfg, mirror) -> None:
    rel = "openimages/" + LABEL_FILES["train"]
    mirror.truncate(rel, keep=0.5)
    cfg = make_cfg(srv=mirror)
    download.run(cfg)
    ranges = [r for p, r in mirror.range_requests if p == rel]
    size = (mirror.root / rel).stat().st_size
    assert len(ranges) == 1, ranges  # one resumed request, not a restart from byte 0
    offset = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= size // 2
    cached = download.cache_dir(cfg, "metadata", cfg.data.metadata_url) / LABEL_FILES["train"]
    assert cached.read_bytes() == (mirror.root / rel).read_bytes()


def test_resumed_download_of_a_changed_file_restarts_with_the_new_file(
    private_mirror, tmp_path
) -> None:
    # The first attempt breaks off halfway; the file then changes on the server (same size, new
    # content). Resuming must not splice the old half onto the new file's tail: the If-Range
    # validator (the ETag kept beside the .part) makes the server send the new file whole.
    rel = LABEL_FILES["validation"]
    src = private_mirror / "openimages" / rel
    old = src.read_bytes()
    header, *rows = old.decode().splitlines(keepends=True)
    new = (header + "".join(reversed(rows))).encode()
    assert len(new) == len(old) and new[: len(old) // 2] != old[: len(old) // 2]
    dest = tmp_path / "cache" / rel
    part = dest.with_name(dest.name + ".part")
    with MirrorServer(private_mirror) as srv:
        url = srv.metadata_url + rel
        srv.truncate(f"openimages/{rel}", keep=0.5)
        with pytest.raises(FetchError, match="gave up"):
            Fetcher(retries=0, backoff=0.01, timeout=5).download_file(url, dest)
        kept = part.read_bytes()
        assert 0 < len(kept) < len(old) and old.startswith(kept) and not dest.exists()

        st = src.stat()
        src.write_bytes(new)
        # a new mtime for sure (the ETag is size + mtime), whatever the file system's clock
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        Fetcher(retries=2, backoff=0.01, timeout=5).download_file(url, dest)

        # the second call did ask to resume at the end of the part...
        assert srv.range_requests == [(f"openimages/{rel}", f"bytes={len(kept)}-")]
    # ...and got the new file whole, not old[:half] + new[half:]
    assert dest.read_bytes() == new
    assert not part.exists() and not dest.with_name(dest.name + ".part.json").exists()


@pytest.mark.slow
def test_killed_download_resumes_without_refetching_completed_images(
    make_cfg, mirror_dir, tmp_path
) -> None:
    with MirrorServer(mirror_dir, latency=0.15) as srv:
        cfg = make_cfg("runtime.fetch.workers=2", srv=srv)
        params = write_params(cfg, tmp_path / "params.yaml")
        proc = subprocess.Popen(
            stage_cmd("download", params),
            cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while sum(1 for p in srv.requests if p.endswith(".jpg")) < 8:
            assert proc.poll() is None, "download finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cache = download.cache_dir(cfg, "images", cfg.data.images_url)
        done = {p.stem for p in cache.rglob("*.jpg")}
        assert 4 <= len(done) < 30, "expected a partial download"
        for p in cache.rglob("*.jpg"):  # only whole, decodable files carry a final name
            with Image.open(p) as im:
                im.load()
        assert not (path(cfg, "raw") / "labels.csv").exists()
        before = dict(srv.requests)

        download.run(cfg)

    again = {p for p, n in srv.requests.items() if n > before.get(p, 0) and p.endswith(".jpg")}
    assert not {p for p in again if Path(p).stem in done}, "completed images were fetched again"
    assert len(read_csv(path(cfg, "raw") / "labels.csv")) == 30
    assert not list(cache.rglob("*.tmp"))


def test_unknown_and_miscased_class_names(make_cfg, mirror, caplog) -> None:
    cfg = make_cfg("data.classes=[zebra, SEA TURTLE, Blue Jay]", srv=mirror)
    assert download.run(cfg)["downloaded"] == 30
    with pytest.raises(InputError, match=r"unknown class 'Sea turtel'.*did you mean 'Sea turtle'"):
        download.run(make_cfg("data.classes=[Zebra, Sea turtel]", srv=mirror))
    with pytest.raises(InputError, match="'Personal flotation device'"):
        download.run(make_cfg("data.classes=[Personal flotation device]", srv=mirror))
    mirror.reset_counts()
    # the entry point turns it into exit code 2 before anything is fetched
    params = write_params(
        make_cfg("data.classes=[Zebra, Whael]", srv=mirror),
        Path(cfg.paths.root).parent / "bad.yaml",
    )
    assert cli.run_stage("download", download.run, ["--params", str(params)]) == 2
    assert "unknown class 'Whael': did you mean" in caplog.text and "'Whale'" in caplog.text
    assert not mirror.requests


def test_class_with_no_image_is_an_error_or_a_counted_skip(make_cfg, mirror) -> None:
    cfg = make_cfg("data.classes=[Zebra, Armadillo]", srv=mirror)
    with pytest.raises(InputError, match=r"Armadillo.*on_empty_class=skip"):
        download.run(cfg)
    assert not path(cfg, "raw").exists(), "a failed run must not leave outputs"
    metrics = download.run(
        make_cfg("data.classes=[Zebra, Armadillo]", "data.on_empty_class=skip", srv=mirror)
    )
    assert metrics["empty_classes"] == 1 and metrics["all.Armadillo.count"] == 0
    assert metrics["downloaded"] == metrics["all.Zebra.count"] > 0


def test_bad_rows_and_traversal_ids_are_counted_never_fetched(
    make_cfg, private_mirror, manifest
) -> None:
    zebra = manifest["classes"]["Zebra"]
    labels = private_mirror / "openimages" / LABEL_FILES["train"]
    with open(labels, "a") as f:
        f.write(f"../../etc/passwd,verification,{zebra},1\n")
        f.write(f"ABCDEF0123456789,verification,{zebra},1\n")  # upper case: not an ImageID
        f.write(f"0123456789abcdef,verification,{zebra},yes\n")  # bad confidence
        f.write(f"0123456789abcdee,verification,{zebra}\n")  # missing field
    scan = scan_labels(labels, [zebra])
    assert scan.bad_ids == 2 and scan.malformed == 1 + 2
    with MirrorServer(private_mirror) as srv:
        metrics = download.run(make_cfg(srv=srv))
        assert not any("passwd" in p or "ABCDEF" in p for p in srv.requests)
    assert metrics["bad_image_ids"] == 2 and metrics["malformed_rows"] == 3
    assert metrics["downloaded"] == 30


def test_wrong_file_at_a_label_url_is_a_clear_error(make_cfg, private_mirror) -> None:
    labels = private_mirror / "openimages" / LABEL_FILES["validation"]
    labels.write_text("<html>Access denied</html>\n")
    with MirrorServer(private_mirror) as srv, pytest.raises(InputError, match="header"):
        download.run(make_cfg(srv=srv))


def test_fetcher_gives_up_after_retries_and_names_the_cause(mirror, manifest) -> None:
    iid = manifest["downloadable"]["Zebra"][0]["id"]
    split = manifest["downloadable"]["Zebra"][0]["split"]
    mirror.fail_first(image_path(split, iid), times=10, status=503)
    fetcher = Fetcher(retries=2, backoff=0.01, timeout=5)
    with pytest.raises(download.FetchError, match="gave up after 2 retries.*HTTP 503"):
        fetcher.get_bytes(mirror.images_url + f"{split}/{iid}.jpg")
    assert mirror.requests[image_path(split, iid)] == 3


def test_parallel_jobs_sharing_a_cache_fetch_a_metadata_file_once(mirror, tmp_path) -> None:
    # a DVC queue or a sweep: two processes need the same uncached label file at the same time;
    # without the lock both append to one `.part` and the file is corrupt
    from concurrent.futures import ThreadPoolExecutor

    rel = LABEL_FILES["validation"]
    mirror.delay(f"openimages/{rel}", 0.5)  # the first download is still running when the next asks
    dest = tmp_path / "cache" / rel
    fetchers = [Fetcher(retries=1, backoff=0.01, timeout=10) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        got = list(
            pool.map(lambda f: f.download_file(f"{mirror.metadata_url}{rel}", dest), fetchers)
        )
    assert got == [dest] * 3
    assert mirror.requests[f"openimages/{rel}"] == 1
    with urllib.request.urlopen(f"{mirror.metadata_url}{rel}") as r:
        assert dest.read_bytes() == r.read()
