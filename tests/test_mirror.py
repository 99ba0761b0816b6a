"""The Open Images mirror (oimirror/): generated layout, real photos laid out the same way,
and the fault-injecting server."""

from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import importlib.resources
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from conftest import free_port
from PIL import Image, ImageOps, UnidentifiedImageError

from oimirror import (
    EXIF_ORIENTATION_TAG,
    IMAGE_ID_FILES,
    IMAGE_ID_HEADER,
    LABEL_FILES,
    LABEL_HEADER,
    SPLITS,
    MirrorServer,
    generate,
    generate_from_folders,
)
from oimirror.cli import main as mirror_main
from oipipe.core import config
from stages import download

HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("mirror")
    return out, generate(out, images_per_class=7, seed=3)


@pytest.fixture(scope="module")
def server(generated: tuple[Path, dict[str, Any]]) -> Iterator[MirrorServer]:
    with MirrorServer(generated[0]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_server(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.clear_faults()
        srv.reset_counts()


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def positives(meta: Path) -> dict[str, set[tuple[str, str]]]:
    """LabelName -> {(ImageID, split)} of human-verified positives, skipping malformed rows."""
    out: dict[str, set[tuple[str, str]]] = {}
    for split in SPLITS:
        for row in read_csv(meta / LABEL_FILES[split])[1:]:
            if len(row) == 4 and row[1] != "machine" and row[3] == "1":
                out.setdefault(row[2], set()).add((row[0], split))
    return out


def image_path(root: Path, entry: dict[str, Any]) -> Path:
    return root / "open-images-dataset" / entry["split"] / f"{entry['id']}.jpg"


# ---------------------------------------------------------------- generator


def test_layout_and_headers(generated: tuple[Path, dict[str, Any]]) -> None:
    root, _ = generated
    meta = root / "openimages"
    bundled = (
        importlib.resources.files("oipipe.data") / "resources" / "class-descriptions-boxable.csv"
    ).read_bytes()
    assert (meta / "v5/class-descriptions-boxable.csv").read_bytes() == bundled
    v7 = (meta / "v7/oidv7-class-descriptions-boxable.csv").read_bytes()
    assert v7 == b"LabelName,DisplayName\n" + bundled
    assert len(read_csv(meta / "v5/class-descriptions-boxable.csv")) == 601
    for split in SPLITS:
        assert tuple(read_csv(meta / LABEL_FILES[split])[0]) == LABEL_HEADER
        assert tuple(read_csv(meta / IMAGE_ID_FILES[split])[0]) == IMAGE_ID_HEADER
        assert (root / "open-images-dataset" / split).is_dir()
    assert IMAGE_ID_FILES["train"] == "2018_04/train/train-images-boxable-with-rotation.csv"
    assert LABEL_FILES["test"] == "v5/test-annotations-human-imagelabels-boxable.csv"


def test_label_rows(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    meta = root / "openimages"
    bad = manifest["malformed_row"]
    lines = (meta / bad["file"]).read_text().splitlines()
    assert lines[bad["line"] - 1] == bad["text"]
    malformed = 0
    sources: set[str] = set()
    for split in SPLITS:
        for row in read_csv(meta / LABEL_FILES[split])[1:]:
            if len(row) != 4:
                malformed += 1
                assert split == "train" and ",".join(row) == bad["text"]
                continue
            assert HEX16.match(row[0]) and row[2].startswith("/m/")
            sources.add(row[1])
            if row[1] == "machine":
                assert 0 < float(row[3]) < 1
            else:
                assert row[3] in ("0", "1")
    assert malformed == 1
    assert {"verification", "machine"} <= sources
    # Rows are shuffled, not grouped by class.
    labels = [r[2] for r in read_csv(meta / LABEL_FILES["train"])[1:] if len(r) == 4]
    assert labels != sorted(labels)
    kinds = {(d["source"], d["confidence"] == "0") for d in manifest["decoy_rows"]}
    assert ("verification", True) in kinds and any(s == "machine" for s, _ in kinds)


def test_image_id_rows(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    meta = root / "openimages"
    seen: set[str] = set()
    raw = "".join((meta / IMAGE_ID_FILES[s]).read_text() for s in SPLITS)
    assert re.search(r',"[^"\n]*,[^"\n]*"', raw), "some quoted field must contain a comma"
    assert '""' in raw, "some field must contain an escaped quote"
    for split in SPLITS:
        for row in read_csv(meta / IMAGE_ID_FILES[split])[1:]:
            assert len(row) == len(IMAGE_ID_HEADER)
            assert HEX16.match(row[0]) and row[0] not in seen
            seen.add(row[0])
            assert row[1] == split
            assert row[4] == "https://creativecommons.org/licenses/by/2.0/"
            assert row[11] in ("0.0", "")
    expected = {e["id"] for lst in manifest["downloadable"].values() for e in lst}
    for key in ("missing", "not_jpeg", "truncated", "multi_class", "distractors"):
        expected |= {e["id"] for e in manifest[key]}
    assert seen == expected


def test_manifest_matches_labels_and_bucket(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["classes"] == {
        "Zebra": "/m/0898b",
        "Sea turtle": "/m/0120dh",
        "Blue jay": "/m/01f8m5",
    }
    pos = positives(root / "openimages")
    for name, label in manifest["classes"].items():
        entries = manifest["downloadable"][name]
        assert len(entries) == 7
        assert {e["split"] for e in entries} == set(SPLITS)
        expected = {(e["id"], e["split"]) for e in entries}
        for key in ("missing", "not_jpeg"):
            expected |= {(e["id"], e["split"]) for e in manifest[key] if e["class"] == name}
        expected |= {(e["id"], e["split"]) for e in manifest["multi_class"] if name in e["classes"]}
        assert pos[label] == expected
    for name, label in manifest["distractor_classes"].items():
        assert pos[label] == {
            (e["id"], e["split"]) for e in manifest["distractors"] if e["class"] == name
        }
    assert len(manifest["missing"]) == 3
    for e in manifest["missing"]:
        assert not image_path(root, e).exists()
    for e in manifest["multi_class"] + manifest["distractors"]:
        assert image_path(root, e).is_file()
    assert len(manifest["multi_class"]) == 6
    (bad,) = manifest["not_jpeg"]
    with pytest.raises(UnidentifiedImageError):
        Image.open(image_path(root, bad))
    assert manifest["truncated"] == []  # only on request: other tests count the faults


def test_truncated_jpegs_are_cut_on_disk_and_served_whole(tmp_path: Path) -> None:
    manifest = generate(
        tmp_path, classes=["Zebra", "Blue jay"], images_per_class=3, seed=4, truncated=3
    )
    assert [e["class"] for e in manifest["truncated"]] == ["Zebra", "Blue jay", "Zebra"]
    pos = positives(tmp_path / "openimages")
    with MirrorServer(tmp_path) as srv:
        for e in manifest["truncated"]:
            assert e["split"] == "train"
            assert (e["id"], "train") in pos[manifest["classes"][e["class"]]]
            body = image_path(tmp_path, e).read_bytes()
            # a JPEG's start, without its end: a check of the first bytes would pass it
            assert body.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in body
            with Image.open(image_path(tmp_path, e)) as im:
                assert im.format == "JPEG"
                with pytest.raises(OSError, match="truncated"):
                    im.load()
            r = requests.get(f"{srv.images_url}train/{e['id']}.jpg", timeout=5)
            assert r.status_code == 200 and r.headers["Content-Length"] == str(len(body))
            assert r.content == body


def test_images_decode_and_exif(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    rotated = 0
    for entries in manifest["downloadable"].values():
        for e in entries:
            with Image.open(image_path(root, e)) as raw:
                assert raw.format == "JPEG"
                orientation = raw.getexif().get(EXIF_ORIENTATION_TAG)
                assert orientation == e["exif_orientation"]
                upright = ImageOps.exif_transpose(raw).convert("RGB")
                w, h = e["size"]
                assert upright.size == (w, h) and 96 <= w <= 200 and 96 <= h <= 200
                if orientation is not None:
                    rotated += 1
                    assert raw.size == (h, w)
                # The white marker sits in the top-left corner only when upright.
                arr = np.asarray(upright, dtype=np.float32)
                m = max(4, min(w, h) // 8) - 2
                corners = [arr[:m, :m], arr[:m, -m:], arr[-m:, :m], arr[-m:, -m:]]
                means = [c.mean() for c in corners]
                assert means[0] > 225 and means[0] == max(means)
    assert rotated >= 3


def test_classes_are_separable_by_colour(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    feats, ys = [], []
    for k, entries in enumerate(manifest["downloadable"].values()):
        for e in entries:
            with Image.open(image_path(root, e)) as im:
                feats.append(np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)))
                ys.append(k)
    x, y = np.stack(feats), np.array(ys)
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(3)])
    pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() >= 0.9


def test_deterministic_and_padded(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", classes=["Zebra", "Blue jay"], images_per_class=3, seed=1)
    b = generate(
        tmp_path / "b",
        classes=["Zebra", "Blue jay"],
        images_per_class=3,
        seed=1,
        label_pad_bytes=200_000,
    )
    c = generate(tmp_path / "c", classes=["Zebra", "Blue jay"], images_per_class=3, seed=2)
    assert a["downloadable"] == b["downloadable"] and a["malformed_row"] == b["malformed_row"]
    assert a["downloadable"] != c["downloadable"]
    again = generate(tmp_path / "c", classes=["Zebra", "Blue jay"], images_per_class=3, seed=1)
    assert again == a
    jpgs = {p.stem for p in (tmp_path / "c/open-images-dataset").rglob("*.jpg")}
    assert jpgs == {p.stem for p in (tmp_path / "a/open-images-dataset").rglob("*.jpg")}
    e = a["downloadable"]["Zebra"][0]
    assert image_path(tmp_path / "a", e).read_bytes() == image_path(tmp_path / "b", e).read_bytes()
    val_a, val_b = (tmp_path / d / "openimages" / LABEL_FILES["validation"] for d in "ab")
    assert val_a.read_bytes() == val_b.read_bytes()
    train = tmp_path / "b/openimages" / LABEL_FILES["train"]
    assert train.stat().st_size >= 200_000 and b["label_pad_rows"] > 1000
    requested = set(b["classes"].values()) | set(b["distractor_classes"].values())
    rows = read_csv(train)[1:]
    assert sum(len(r) != 4 for r in rows) == 1
    pad = rows[-b["label_pad_rows"] :]
    assert all(HEX16.match(r[0]) and r[2] not in requested and r[3] == "1" for r in pad)


def test_class_names_resolve_as_the_download_stage_resolves_them(tmp_path: Path) -> None:
    # any case, as data.classes accepts it; the manifest holds the Open Images display name
    m = generate(
        tmp_path / "any-case", classes=["sea TURTLE"], images_per_class=1, distractor_classes=()
    )
    assert m["classes"] == {"Sea turtle": "/m/0120dh"} and list(m["downloadable"]) == ["Sea turtle"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown class 'Zebr': did you mean 'Zebra'"):
        generate(tmp_path, classes=["Zebr"])
    with pytest.raises(ValueError, match=r"distractor classes: unknown class 'Unicorn'"):
        generate(tmp_path, distractor_classes=["Unicorn"])
    with pytest.raises(ValueError, match="distractor"):
        generate(tmp_path, classes=["Apple"])
    (tmp_path / "openimages").mkdir()
    with pytest.raises(FileExistsError):
        generate(tmp_path, images_per_class=1)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["generate", str(out), "--classes", "Zebra", "Sea turtle", "--images-per-class", "3"]
    assert mirror_main([*argv, "--seed", "5", "--truncated", "1"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["classes"]) == ["Zebra", "Sea turtle"]
    assert manifest["seed"] == 5 and manifest["images_per_class"] == 3
    assert {c: len(v) for c, v in manifest["downloadable"].items()} == {"Zebra": 3, "Sea turtle": 3}
    for e in [e for v in manifest["downloadable"].values() for e in v]:
        with Image.open(image_path(out, e)) as im:
            im.load()
    assert not any(image_path(out, e).exists() for e in manifest["missing"])
    # the summary line counts what was written
    m = re.fullmatch(
        r"wrote (\S+) in [\d.]+s: (\d+) downloadable images, (\d+) missing, (\d+) not JPEG, "
        r"(\d+) truncated, (\d+) multi-class; manifest (\S+)\n",
        printed,
    )
    assert m, printed
    assert (m[1], m[7]) == (str(out), str(out / "manifest.json"))
    counts = [int(n) for n in m.groups()[1:6]]
    kinds = ("missing", "not_jpeg", "truncated", "multi_class")
    assert counts == [6, *(len(manifest[k]) for k in kinds)] == [6, 2, 1, 1, 6]
    # and it wrote, to the byte, what the function writes for the same arguments
    api = tmp_path / "api"
    generate(api, classes=["Zebra", "Sea turtle"], images_per_class=3, seed=5, truncated=1)
    assert tree(out) == tree(api)
    assert_one_line_error(
        capsys,
        ["generate", str(out), "--classes", "Personal flotation device"],
        r"unknown class 'Personal flotation device'",
    )
    assert_one_line_error(
        capsys,
        ["serve", str(tmp_path / "nothing")],
        r"has no openimages/ and open-images-dataset/: run .* generate",
    )


def assert_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    """The CLI exits 2 with one `python -m oimirror: error: ...` line and no traceback."""
    assert mirror_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(r"python -m oimirror: error: ", err), err
    assert re.search(match, err), err


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serve_serves_the_generated_mirror(
    generated: tuple[Path, dict[str, Any]], stop: signal.Signals
) -> None:
    """Served until Ctrl-C or SIGTERM, even when started as a shell's background job (`&`, as
    `make offline` does), which inherits SIGINT ignored."""
    root, manifest = generated
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "oimirror", "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        base = f"http://127.0.0.1:{port}/"
        assert lines == [
            f"metadata base: {base}openimages/\n",
            f"images base:   {base}open-images-dataset/\n",
        ], proc.stderr.read() if proc.poll() is not None else lines
        rel, key = one_image(manifest)
        r = requests.get(f"{base}open-images-dataset/{rel}", timeout=5)
        assert r.status_code == 200 and r.content == (root / key).read_bytes()
        r = requests.get(f"{base}openimages/{LABEL_FILES['train']}", timeout=5)
        assert r.content == (root / "openimages" / LABEL_FILES["train"]).read_bytes()
        proc.send_signal(stop)
        assert proc.wait(timeout=10) == 0
        assert "stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- server


def one_image(manifest: dict[str, Any]) -> tuple[str, str]:
    e = manifest["downloadable"]["Zebra"][0]
    return f"{e['split']}/{e['id']}.jpg", f"open-images-dataset/{e['split']}/{e['id']}.jpg"


def test_urls_and_full_get(server: MirrorServer, generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/openimages/", server.metadata_url)
    assert server.images_url == server.metadata_url.replace("openimages/", "open-images-dataset/")
    rel, key = one_image(manifest)
    body = (root / key).read_bytes()
    r = requests.get(server.images_url + rel, timeout=5)
    assert r.status_code == 200 and r.content == body
    assert r.headers["Content-Type"] == "image/jpeg"
    assert r.headers["Content-Length"] == str(len(body))
    assert r.headers["Accept-Ranges"] == "bytes" and r.headers["ETag"]
    r = requests.get(server.metadata_url + LABEL_FILES["train"], timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    assert r.content == (root / "openimages" / LABEL_FILES["train"]).read_bytes()
    h = requests.head(server.images_url + rel, timeout=5)
    assert h.status_code == 200 and h.headers["Content-Length"] == str(len(body))
    assert server.requests[key] == 1 and server.head_requests[key] == 1


def test_ranges(server: MirrorServer, generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    rel, key = one_image(manifest)
    body = (root / key).read_bytes()
    size = len(body)
    url = server.images_url + rel
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert r.status_code == 206 and r.content == body[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{size}"
    assert r.headers["Content-Length"] == "10"
    r = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert r.status_code == 206 and r.content == body[100:]
    assert r.headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    r = requests.get(url, headers={"Range": f"bytes={size - 5}-{size + 100}"}, timeout=5)
    assert r.status_code == 206 and r.content == body[-5:]
    r = requests.get(url, headers={"Range": "bytes=-7"}, timeout=5)
    assert r.status_code == 206 and r.content == body[-7:]
    r = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=5)
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
    etag = requests.head(url, timeout=5).headers["ETag"]
    r = requests.get(url, headers={"Range": "bytes=5-", "If-Range": etag}, timeout=5)
    assert r.status_code == 206 and r.content == body[5:]
    r = requests.get(url, headers={"Range": "bytes=5-", "If-Range": '"stale"'}, timeout=5)
    assert r.status_code == 200 and r.content == body
    assert server.range_requests[0] == (key, "bytes=10-19")
    assert len(server.range_requests) == 7


def test_missing_and_traversal(
    server: MirrorServer, generated: tuple[Path, dict[str, Any]]
) -> None:
    root, manifest = generated
    (root.parent / "secret.txt").write_text("secret")
    missing = manifest["missing"][0]
    r = requests.get(f"{server.images_url}{missing['split']}/{missing['id']}.jpg", timeout=5)
    assert r.status_code == 404
    assert requests.get(server.images_url + "train/", timeout=5).status_code == 404
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    for path in (
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/openimages/../../secret.txt",
        "//" + str(root.parent / "secret.txt"),
    ):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 404 and b"secret" not in resp.read(), path
    conn.close()


def test_fail_first_and_counting(
    server: MirrorServer, generated: tuple[Path, dict[str, Any]]
) -> None:
    _, manifest = generated
    rel, key = one_image(manifest)
    url = server.images_url + rel
    server.fail_first(key, times=2, status=503)
    with requests.Session() as s:
        assert [s.get(url, timeout=5).status_code for _ in range(3)] == [503, 503, 200]
    assert server.requests[key] == 3
    server.fail_first(lambda p: p.endswith(".csv"), status=429)
    r = requests.get(server.metadata_url + LABEL_FILES["test"], timeout=5)
    assert r.status_code == 429
    assert requests.get(server.metadata_url + LABEL_FILES["test"], timeout=5).status_code == 200
    server.reset_counts()
    assert not server.requests and not server.range_requests


def test_truncate(server: MirrorServer, generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    rel, key = one_image(manifest)
    body = (root / key).read_bytes()
    server.truncate(key, times=2, keep=0.5)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    conn.request("GET", "/" + key)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(body))
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == body[: len(body) // 2]
    conn.close()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(server.images_url + rel, timeout=5)
    r = requests.get(server.images_url + rel, timeout=5)
    assert r.status_code == 200 and r.content == body
    assert server.requests[key] == 3


def test_delay_latency_and_close(generated: tuple[Path, dict[str, Any]]) -> None:
    root, manifest = generated
    rel, key = one_image(manifest)
    with MirrorServer(root, latency=0.05) as srv:
        start = time.perf_counter()
        assert requests.get(srv.images_url + rel, timeout=5).status_code == 200
        assert time.perf_counter() - start >= 0.05
        srv.delay(key, 30)
        with pytest.raises(requests.exceptions.Timeout):
            requests.get(srv.images_url + rel, timeout=0.3)
        assert srv.requests[key] == 2
        start = time.perf_counter()
    assert time.perf_counter() - start < 2, "close() must not wait for hung handlers"


# ---------------------------------------------------------------- real photos (--from-folders)

REALDATA = config.PROJECT_ROOT.parent / "shared" / "realdata"


def jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=90)
    return path.read_bytes()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_from_folders_lays_photos_out_as_open_images_serves_them(
    tmp_path: Path, generated: tuple[Path, dict[str, Any]]
) -> None:
    photos = tmp_path / "photos"
    # "zebra" in another case than Open Images' "Zebra"; a real 16-hex ImageID keeps its ID
    for i in range(4):
        jpeg(photos / "zebra" / f"z{i}.jpg", (40 * i, 200, 10))
    jpeg(photos / "zebra" / "more" / "0123456789abcdef.jpg", (0, 0, 250))
    cut = jpeg(photos / "zebra" / "broken.jpg", (9, 9, 9), (400, 300))
    (photos / "zebra" / "broken.jpg").write_bytes(cut[: len(cut) // 2])
    (photos / "zebra" / "notes.txt").write_text("shot at the zoo\n")
    (photos / "zebra" / "zz-copy.jpg").write_bytes((photos / "zebra" / "z1.jpg").read_bytes())
    (photos / "zebra" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: never counted
    for i in range(3):
        jpeg(photos / "Sea turtle" / f"t{i}.jpg", (200, 40 * i, 90))
    Image.new("RGB", (8, 8)).save(photos / "Sea turtle" / "png.jpg", "PNG")

    out = tmp_path / "mirror"
    manifest = generate_from_folders(out, photos, seed=1)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["classes"] == {"Sea turtle": "/m/0120dh", "Zebra": "/m/0898b"}
    assert manifest["folders"] == {"Sea turtle": "Sea turtle", "Zebra": "zebra"}
    # the same metadata files, with the same class tables, as the synthetic mirror
    synthetic = generated[0] / "openimages"
    meta = out / "openimages"
    assert tree(meta).keys() == tree(synthetic).keys()
    for rel in ("v5/class-descriptions-boxable.csv", "v7/oidv7-class-descriptions-boxable.csv"):
        assert (meta / rel).read_bytes() == (synthetic / rel).read_bytes()
    for split in SPLITS:
        assert tuple(read_csv(meta / LABEL_FILES[split])[0]) == LABEL_HEADER
        assert tuple(read_csv(meta / IMAGE_ID_FILES[split])[0]) == IMAGE_ID_HEADER

    labels = {s: read_csv(meta / LABEL_FILES[s])[1:] for s in SPLITS}
    ids = {s: {r[0]: r for r in read_csv(meta / IMAGE_ID_FILES[s])[1:]} for s in SPLITS}
    sources = {}
    for name, entries in manifest["downloadable"].items():
        for e in entries:
            body = (photos / e["source"]).read_bytes()
            assert image_path(out, e).read_bytes() == body  # the photo, byte for byte
            assert [e["id"], "verification", manifest["classes"][name], "1"] in labels[e["split"]]
            row = ids[e["split"]][e["id"]]
            assert row[1] == e["split"] and row[7] == e["source"]
            assert (row[8], row[9]) == (str(len(body)), md5_b64(body))
            sources[e["source"]] = (name, e["id"])
    assert sources["zebra/more/0123456789abcdef.jpg"] == ("Zebra", "0123456789abcdef")
    assert {s: n for s, (n, _) in sources.items()} == {
        **{f"zebra/z{i}.jpg": "Zebra" for i in range(4)},
        "zebra/more/0123456789abcdef.jpg": "Zebra",
        **{f"Sea turtle/t{i}.jpg": "Sea turtle" for i in range(3)},
    }
    # every served image is listed, in exactly one split, and nothing else is in the bucket
    served = {p.stem: p.parent.name for p in (out / "open-images-dataset").rglob("*.jpg")}
    assert served == {e["id"]: e["split"] for v in manifest["downloadable"].values() for e in v}
    assert {e["split"] for e in manifest["downloadable"]["Zebra"]} == set(SPLITS)  # 5 -> 3/1/1
    assert sum(len(r) for r in labels.values()) == 8
    skipped = {s["source"]: s["reason"].split(":")[0] for s in manifest["skipped"]}
    assert skipped == {
        "zebra/broken.jpg": "unreadable",
        "zebra/notes.txt": "unreadable",
        "Sea turtle/png.jpg": "unreadable",
        "zebra/zz-copy.jpg": "duplicate",
    }
    assert manifest["skip_reasons"] == {"unreadable": 3, "duplicate": 1}
    # same photos and seed, same mirror
    again = generate_from_folders(tmp_path / "again", photos, seed=1)
    assert again["downloadable"] == manifest["downloadable"]
    assert tree(tmp_path / "again" / "openimages") == tree(meta)


def test_from_folders_cli_and_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    for i in range(3):
        jpeg(photos / "Zebra" / f"z{i}.jpg", (80 * i, 10, 10))
        jpeg(photos / "Blue jay" / f"b{i}.jpg", (10, 10, 80 * i))
    out = tmp_path / "mirror"
    argv = ["generate", str(out), "--from-folders", str(photos)]
    assert mirror_main([*argv, "--classes", "Zebra", "--images-per-class", "2"]) == 0
    printed = capsys.readouterr().out
    o = re.escape(str(out))
    assert re.fullmatch(
        rf"wrote {o} in [\d.]+s: 2 photos \(Zebra 2\), 0 skipped; manifest "
        rf"{o}/manifest\.json\n",
        printed,
    ), printed
    assert_one_line_error(capsys, [*argv, "--truncated", "1"], "synthetic mirror only")
    assert_one_line_error(capsys, [*argv, "--classes", "Zebras"], r"no folder 'Zebras'")
    (photos / "Zebras").mkdir()
    assert_one_line_error(
        capsys,
        argv,
        r"must be named after an Open Images class: unknown "
        r"class 'Zebras': did you mean 'Zebra'",
    )
    (photos / "Zebras").rmdir()
    (photos / "Sea turtle").mkdir()
    assert_one_line_error(capsys, argv, r"Sea turtle: empty class folder")
    (photos / "Sea turtle" / "notes.txt").write_text("to do: add photos\n")
    assert_one_line_error(
        capsys,
        argv,
        r"Sea turtle: no whole JPEG among its 1 file\(s\) "
        r"\(first: unreadable: not a JPEG",
    )
    assert_one_line_error(
        capsys, ["generate", str(out), "--from-folders", str(tmp_path / "x")], "is not a folder"
    )
    # the failed runs checked before they wrote: the earlier mirror is as it was
    kept = json.loads((out / "manifest.json").read_text())["downloadable"]
    assert list(kept) == ["Zebra"] and all(image_path(out, e).is_file() for e in kept["Zebra"])


def test_real_photos_through_the_mirror_and_the_download_stage(make_cfg, tmp_path: Path) -> None:
    """../shared/realdata laid out as Open Images, served on 127.0.0.1 and fetched by the real
    download stage: every image arrives byte for byte, under the class of its folder."""
    if not (REALDATA / "Plastic bag").is_dir():
        pytest.skip(f"real photos not found at {REALDATA} (the shared folder beside the clone)")
    manifest = generate_from_folders(tmp_path / "mirror", REALDATA, images_per_class=4, seed=0)
    assert list(manifest["classes"]) == ["Airplane", "Bird", "Plastic bag"]
    source_of = {
        e["id"]: (name, e["source"]) for name, v in manifest["downloadable"].items() for e in v
    }
    # Plastic bag's files are named by their real Open Images ImageIDs, and keep them
    assert all(Path(s).stem == iid for iid, (n, s) in source_of.items() if n == "Plastic bag")
    with MirrorServer(tmp_path / "mirror") as srv:
        cfg = make_cfg(
            "data.classes=[Airplane, Bird, Plastic bag]", "data.max_images_per_class=3", srv=srv
        )
        metrics = download.run(cfg)
    assert (metrics["selected"], metrics["downloaded"], metrics["missing"]) == (9, 9, 0)
    raw = config.path(cfg, "raw")
    rows = read_rows(raw / "labels.csv")
    assert Counter(r["class"] for r in rows) == {"Airplane": 3, "Bird": 3, "Plastic bag": 3}
    for r in rows:
        name, source = source_of[r["ImageID"]]
        assert r["class"] == name and r["label_name"] == manifest["classes"][name]
        got = (raw / r["file"]).read_bytes()
        assert got == (REALDATA / source).read_bytes(), source


def read_rows(p: Path) -> list[dict[str, str]]:
    with p.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
