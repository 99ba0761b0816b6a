"""Stage `prepare`: stratified seeded split, decode once with EXIF orientation, resize."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from oipipe.core.config import path
from oipipe.core.errors import InputError
from oipipe.core.files import read_csv
from stages import download, prepare


@pytest.fixture
def downloaded(make_cfg, mirror):
    cfg = make_cfg(srv=mirror)
    download.run(cfg)
    return cfg


def test_prepare_end_to_end(downloaded, manifest) -> None:
    cfg = downloaded
    metrics = prepare.run(cfg)
    out = path(cfg, "prepared")
    classes = (out / "labels.txt").read_text().splitlines()
    assert classes == list(manifest["classes"])
    rows = {s: read_csv(out / f"{s}.csv") for s in ("train", "val", "test")}
    all_ids = [r["image_id"] for rs in rows.values() for r in rs]
    assert len(all_ids) == len(set(all_ids)) == 30  # every image in exactly one split
    truth = {e["id"]: (name, e) for name, items in manifest["downloadable"].items() for e in items}
    for split, rs in rows.items():
        # stratified: 10 per class split 8/1/1
        assert Counter(r["class"] for r in rs) == {
            c: {"train": 8, "val": 1, "test": 1}[split] for c in classes
        }
        for r in rs:
            name, entry = truth[r["image_id"]]
            assert r["class"] == name and classes[int(r["label"])] == name
            with Image.open(out / r["file"]) as im:
                im.load()
                assert min(im.size) == cfg.data.image_size
                w, h = entry["size"]  # the upright size: EXIF orientation was applied
                assert (im.width > im.height) == (w > h)
    assert metrics["train.images"] == 24 and metrics["skipped_undecodable"] == 0
    assert json.loads((path(cfg, "metrics") / "prepare.json").read_text()) == metrics
    # the mirror rotates every fifth image via EXIF, so some did need transposing
    assert any(e["exif_orientation"] for _, e in truth.values())


def test_exif_rotated_image_is_stored_upright(downloaded, manifest) -> None:
    prepare.run(downloaded)
    rotated = [
        e for items in manifest["downloadable"].values() for e in items if e["exif_orientation"]
    ]
    for e in rotated:
        raw = path(downloaded, "raw") / "images" / e["split"] / f"{e['id']}.jpg"
        with Image.open(raw) as im:
            stored = im.size
        with Image.open(path(downloaded, "prepared") / "images" / f"{e['id']}.jpg") as im:
            prepared = im.size
        # the raw pixels are stored sideways; the prepared image has the upright aspect
        assert (stored[0] > stored[1]) != (prepared[0] > prepared[1])


def test_split_is_seeded_and_official_mode_keeps_official_splits(make_cfg, mirror) -> None:
    def splits(*overrides: str) -> dict[str, str]:
        cfg = make_cfg(*overrides, srv=mirror)
        download.run(cfg)
        prepare.run(cfg)
        return {
            r["image_id"]: (s, r["official_split"])
            for s in ("train", "val", "test")
            for r in read_csv(path(cfg, "prepared") / f"{s}.csv")
        }

    a, b = splits(), splits()
    assert a == b
    c = splits("data.seed=7")
    assert {k: v[0] for k, v in a.items() if k in c} != {k: v[0] for k, v in c.items() if k in a}
    official = splits("data.split.mode=official")
    assert all(
        {"train": "train", "validation": "val", "test": "test"}[o] == s
        for s, o in official.values()
    )


def test_undecodable_images_are_skipped_and_counted(downloaded) -> None:
    raw = path(downloaded, "raw")
    victims = read_csv(raw / "labels.csv")[:2]
    for r in victims:
        f = raw / "images" / r["split"] / f"{r['ImageID']}.jpg"
        data = f.read_bytes()
        f.unlink()  # a hard link to the download cache: replace it, never write through it
        f.write_bytes(data[: len(data) // 3])
    metrics = prepare.run(downloaded)
    assert metrics["skipped_undecodable"] == 2
    assert metrics["all.images"] == 28
    skipped = {r["ImageID"] for r in read_csv(path(downloaded, "prepared") / "skipped.csv")}
    assert skipped == {r["ImageID"] for r in victims}


def test_allocate_gives_every_split_an_image_when_it_can() -> None:
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    assert prepare.allocate(3, ratios) == {"train": 1, "val": 1, "test": 1}
    assert prepare.allocate(10, ratios) == {"train": 8, "val": 1, "test": 1}
    assert prepare.allocate(2, ratios) == {"train": 2, "val": 0, "test": 0}
    assert sum(prepare.allocate(997, ratios).values()) == 997


def test_prepare_without_download_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(InputError, match="run the download stage first"):
        prepare.run(make_cfg())


def test_class_order_comes_from_what_download_recorded(downloaded, manifest) -> None:
    raw = path(downloaded, "raw")
    assert (raw / "classes.txt").read_text().splitlines() == list(manifest["classes"])
    reordered = list(reversed(manifest["classes"]))
    (raw / "classes.txt").write_text("".join(f"{c}\n" for c in reordered))
    prepare.run(downloaded)
    assert (path(downloaded, "prepared") / "labels.txt").read_text().splitlines() == reordered
    (raw / "classes.txt").unlink()  # a raw folder from before download recorded the classes
    with pytest.raises(InputError, match="classes.txt not found: rerun the download stage"):
        prepare.run(downloaded)
