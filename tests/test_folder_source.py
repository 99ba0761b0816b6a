"""`data.source=folder`: your own class-per-folder photos through `download` and `prepare`.

The photos are real (copied from ../shared/realdata beside the project); the faults around them
(a truncated JPEG, a text file, a PNG under a .jpg name, an EXIF-rotated JPEG, a duplicate) are
made here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from oipipe.core.config import CHOICES, PROJECT_ROOT, compose, path
from oipipe.core.errors import ConfigError, InputError
from oipipe.core.files import read_csv
from stages import download, prepare

REALDATA = PROJECT_ROOT.parent / "shared" / "realdata"
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def realdata() -> Path:
    if not (REALDATA / "Bird").is_dir():
        pytest.skip(f"real photos not found at {REALDATA} (the shared folder beside the clone)")
    return REALDATA


def real_photos(realdata: Path, cls: str, n: int) -> list[Path]:
    return sorted((realdata / cls).glob("*.jpg"))[:n]


@pytest.fixture
def tree(realdata: Path, tmp_path: Path) -> Path:
    """Airplane: 4 photos + a truncated JPEG + a text file; Bird: 4 photos + an EXIF-rotated JPEG
    + a byte-identical copy; Plastic bag: 4 photos + a PNG named .jpg. 17 files, 14 images."""
    root = tmp_path / "photos"
    for cls in ("Airplane", "Bird", "Plastic bag"):
        (root / cls).mkdir(parents=True)
        for f in real_photos(realdata, cls, 4):
            shutil.copy(f, root / cls / f.name)
    first_plane = real_photos(realdata, "Airplane", 1)[0].read_bytes()
    (root / "Airplane" / "zz-broken.jpg").write_bytes(first_plane[: len(first_plane) // 2])
    (root / "Airplane" / "notes.txt").write_text("shot on my phone, 2024\n")
    bird = real_photos(realdata, "Bird", 1)[0]
    shutil.copy(bird, root / "Bird" / "zz-copy.jpg")
    # stored 120x80 (landscape) with Orientation=6: the camera was turned, upright it is 80x120
    with Image.open(bird) as im:
        small = im.convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    small.save(root / "Bird" / "rotated.jpg", "JPEG", exif=exif)
    with Image.open(real_photos(realdata, "Plastic bag", 1)[0]) as im:
        im.convert("RGB").resize((90, 60)).save(root / "Plastic bag" / "pasted.jpg", "PNG")
    # never counted: hidden files and folders, files beside the class folders
    (root / "Bird" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "README.md").write_text("my photos\n")
    return root


def folder_cfg(make_cfg, root: Path, *overrides: str):
    return make_cfg("data=realdata", f"data.folder={root}", *overrides)


def test_download_imports_what_decodes_and_lists_the_rest(make_cfg, tree: Path) -> None:
    cfg = folder_cfg(make_cfg, tree)
    metrics = download.run(cfg)
    raw = path(cfg, "raw")

    assert {
        k: metrics[k] for k in ("found", "imported", "undecodable", "not_an_image", "duplicates")
    } == {"found": 17, "imported": 14, "undecodable": 1, "not_an_image": 1, "duplicates": 1}
    assert json.loads((path(cfg, "metrics") / "download.json").read_text()) == metrics
    assert [metrics[f"all.{c}.count"] for c in ("Airplane", "Bird", "Plastic bag")] == [4, 5, 5]
    missing = {r["source"]: r["reason"] for r in read_csv(raw / "missing.csv")}
    assert set(missing) == {"Airplane/zz-broken.jpg", "Airplane/notes.txt", "Bird/zz-copy.jpg"}
    assert missing["Airplane/zz-broken.jpg"].startswith("undecodable: ")
    assert "truncated" in missing["Airplane/zz-broken.jpg"]
    assert missing["Airplane/notes.txt"].startswith("not an image: ")
    first_bird = real_photos(REALDATA, "Bird", 1)[0].name
    assert missing["Bird/zz-copy.jpg"] == f"duplicate: same bytes as Bird/{first_bird}"

    labels = read_csv(raw / "labels.csv")
    attribution = {r["ImageID"]: r for r in read_csv(raw / "attribution.csv")}
    assert len(labels) == len(attribution) == 14
    for r in labels:
        src = attribution[r["ImageID"]]["source"]
        data = (tree / src).read_bytes()
        # the id is the hash of the bytes, and the stored file is those very bytes
        assert r["ImageID"] == hashlib.sha256(data).hexdigest()[:16]
        assert (raw / r["file"]).read_bytes() == data
        assert r["class"] == src.split("/")[0] and r["split"] == ""
    by_source = {a["source"]: a["ImageID"] for a in attribution.values()}
    png = next(r for r in labels if r["ImageID"] == by_source["Plastic bag/pasted.jpg"])
    assert png["file"].endswith(".png")  # the real format, whatever the source file was called
    assert all(r["file"].endswith(".jpg") for r in labels if r is not png)
    assert (raw / "classes.txt").read_text().splitlines() == ["Airplane", "Bird", "Plastic bag"]
    assert len(list((raw / "images").iterdir())) == 14


def test_prepare_orients_resizes_and_splits_stratified(make_cfg, tree: Path) -> None:
    cfg = folder_cfg(make_cfg, tree)
    download.run(cfg)
    metrics = prepare.run(cfg)
    out = path(cfg, "prepared")

    classes = (out / "labels.txt").read_text().splitlines()
    assert classes == ["Airplane", "Bird", "Plastic bag"]  # sorted, like ImageFolder
    rows = {s: read_csv(out / f"{s}.csv") for s in SPLITS}
    ids = [r["image_id"] for rs in rows.values() for r in rs]
    assert sorted(ids) == sorted(r["ImageID"] for r in read_csv(path(cfg, "raw") / "labels.csv"))
    # 0.6/0.2/0.2 per class: 4 -> 2/1/1, 5 -> 3/1/1
    expected = {"Airplane": (2, 1, 1), "Bird": (3, 1, 1), "Plastic bag": (3, 1, 1)}
    for i, split in enumerate(SPLITS):
        assert Counter(r["class"] for r in rows[split]) == {c: n[i] for c, n in expected.items()}
        assert metrics[f"{split}.images"] == len(rows[split])
        for r in rows[split]:
            assert classes[int(r["label"])] == r["class"]
            with Image.open(out / r["file"]) as im:
                assert im.format == "JPEG" and min(im.size) == cfg.data.image_size
    assert metrics["skipped_undecodable"] == 0
    assert read_csv(out / "stats.csv")  # the per-split table is written as well as printed

    attribution = {
        r["source"]: r["ImageID"] for r in read_csv(path(cfg, "raw") / "attribution.csv")
    }
    with Image.open(tree / "Bird" / "rotated.jpg") as im:
        assert im.size == (120, 80)
    with Image.open(out / "images" / f"{attribution['Bird/rotated.jpg']}.jpg") as im:
        assert im.size == (48, 72)  # EXIF orientation 6 applied: width and height swapped
    with Image.open(out / "images" / f"{attribution['Plastic bag/pasted.jpg']}.jpg") as im:
        assert im.size == (72, 48)  # the PNG made it through


def test_classes_select_and_order_folders(make_cfg, tree: Path) -> None:
    cfg = folder_cfg(make_cfg, tree, "data.classes=[Plastic bag,Bird]")
    metrics = download.run(cfg)
    prepare.run(cfg)
    assert (path(cfg, "prepared") / "labels.txt").read_text().splitlines() == [
        "Plastic bag",
        "Bird",
    ]
    assert metrics["found"] == 11 and metrics["imported"] == 10
    assert {r["class"] for r in read_csv(path(cfg, "raw") / "labels.csv")} == {
        "Plastic bag",
        "Bird",
    }

    with pytest.raises(InputError) as err:
        download.run(folder_cfg(make_cfg, tree, "data.classes=[Bird,Cat]"))
    assert "no folder 'Cat'" in str(err.value)
    assert "['Airplane', 'Bird', 'Plastic bag']" in str(err.value)  # hidden folders are no class
    # Open Images class-name checks do not apply to folder names
    cfg = folder_cfg(make_cfg, tree, "data.classes=[Plastic bag]")
    assert download.run(cfg)["imported"] == 5


def test_a_folder_without_images_is_an_error_or_a_counted_skip(make_cfg, tree: Path) -> None:
    (tree / "Empty").mkdir()
    (tree / "Empty" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(InputError, match=r"no decodable image in class folder\(s\) \['Empty'\]"):
        download.run(folder_cfg(make_cfg, tree))
    assert not path(folder_cfg(make_cfg, tree), "raw").exists()  # nothing half-written
    cfg = folder_cfg(make_cfg, tree, "data.on_empty_class=skip")
    metrics = download.run(cfg)
    assert metrics["empty_classes"] == 1 and metrics["undecodable"] == 2
    prepare.run(cfg)
    assert "Empty" not in (path(cfg, "prepared") / "labels.txt").read_text().splitlines()


def test_bad_folder_settings_are_clear_errors(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data.folder: .*nope is not a folder"):
        download.run(folder_cfg(make_cfg, tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="no class sub-folders"):
        download.run(folder_cfg(make_cfg, tmp_path / "flat"))
    with pytest.raises(ConfigError, match=r"data.source.*\['folder', 'openimages'\]"):
        compose(["data.source=flickr"])
    with pytest.raises(ConfigError, match="use data.split.mode=resplit"):
        compose(["data=realdata", "data.split.mode=official"])
    with pytest.raises(ConfigError, match="data.classes is empty"):
        compose(["data.classes=[]"])  # openimages still needs its class names


def test_source_registry_matches_the_config_choices() -> None:
    assert sorted(download.SOURCES) == sorted(CHOICES["data.source"])
    cfg = compose(["data=realdata"])
    assert cfg.data.source == "folder" and list(cfg.data.classes) == []
    assert cfg.data.folder == "../shared/realdata" and cfg.data.image_size == 256
    assert dict(cfg.data.split.ratios) == {"train": 0.6, "val": 0.2, "test": 0.2}
    # the default's folder exists in the repository: DVC hashes it as a download dependency
    assert (PROJECT_ROOT / compose([]).data.folder).is_dir()


def test_the_real_photo_set(make_cfg, realdata: Path) -> None:
    cfg = folder_cfg(make_cfg, realdata)
    metrics = download.run(cfg)
    assert metrics["found"] == metrics["imported"] == 180
    assert metrics["undecodable"] == metrics["not_an_image"] == metrics["duplicates"] == 0
    counts = {"Airplane": 30, "Bird": 30, "Plastic bag": 120}
    assert {c: metrics[f"all.{c}.count"] for c in counts} == counts
    prep = prepare.run(cfg)
    assert prep["all.images"] == 180 and prep["skipped_undecodable"] == 0
    for c, n in counts.items():
        assert [prep[f"{s}.{c}.count"] for s in SPLITS] == [n * 6 // 10, n // 5, n // 5]
