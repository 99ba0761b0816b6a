"""Stage `download`: the raw images and labels, from one of the sources in `SOURCES`.

`openimages` (an Open Images subset by class name, fetched concurrently, cached per base URL) or
`folder` (your photos, class per sub-folder). Either writes the same files under `paths.raw`, so
`prepare` is one for both. Inputs, outputs, settings and exit codes: docs/stages/download.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import ConfigError, InputError
from oipipe.core.files import (
    atomic_dir,
    remove_stale_temps,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)
from oipipe.core.tracking import StageRun, stage_run
from oipipe.data import imaging, openimages, photos
from oipipe.data.fetch import Fetcher, FetchError, NotFound, TooLarge
from oipipe.data.sampling import rank
from oipipe.data.split_counts import STATS_COLUMNS, format_table, split_stats, stats_rows

log = logging.getLogger("stages.download")

MB = 1 << 20  # runtime.fetch.max_image_mb's unit
# What `prepare` reads, whatever the source: `file` is the image's path relative to paths.raw.
LABELS_HEADER = ["ImageID", "split", "class", "label_name", "file"]


@dataclass
class Selection:
    """The sampled images: ImageID -> (official split, display name)."""

    images: dict[str, tuple[str, str]] = field(default_factory=dict)
    candidates: Counter = field(default_factory=Counter)  # per class, before the cap
    multiclass: int = 0
    multiclass_assigned: int = 0
    empty_classes: list[str] = field(default_factory=list)
    duplicate_ids: int = 0


def url_join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def cache_dir(cfg: DictConfig, kind: str, base_url: str) -> Path:
    """Per-base-URL cache, so a mirror's files are never mistaken for the real ones."""
    tag = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:12]
    return path(cfg, "cache") / kind / tag


def select(
    scans: dict[str, openimages.LabelScan],
    classes: dict[str, str],
    cap: int,
    seed: int,
    policy: str,
) -> Selection:
    """Apply the multi-class policy and the per-class cap to the positives of every split."""
    label_to_name = {label: name for name, label in classes.items()}
    order = {name: i for i, name in enumerate(classes)}
    sel = Selection()
    per_class: dict[str, list[tuple[str, str]]] = {name: [] for name in classes}
    seen: set[str] = set()
    for split, scan in scans.items():
        for iid, labels in scan.positives.items():
            if iid in seen:  # an ImageID belongs to one split; keep its first
                sel.duplicate_ids += 1
                continue
            seen.add(iid)
            names = sorted((label_to_name[lab] for lab in labels), key=order.__getitem__)
            if len(names) > 1:
                sel.multiclass += 1
                if policy == "drop":
                    continue
                sel.multiclass_assigned += 1
            per_class[names[0]].append((iid, split))
    for name, items in per_class.items():
        sel.candidates[name] = len(items)
        if not items:
            sel.empty_classes.append(name)
        for iid, split in sorted(items, key=lambda it: rank(seed, it[0]))[:cap]:
            sel.images[iid] = (split, name)
    return sel


def fetch_images(
    sel: Selection,
    fetcher: Fetcher,
    images_url: str,
    cache: Path,
    workers: int,
    max_bytes: int | None = None,
) -> tuple[dict[str, str], int]:
    """Fetch every selected image not in the cache; a body over `max_bytes` is refused.

    Returns ImageID -> failure reason, and how many images were requested.
    """
    todo = [
        (iid, split)
        for iid, (split, _) in sel.images.items()
        if not (cache / split / f"{iid}.jpg").exists()
    ]
    failures: dict[str, str] = {}
    if not todo:
        return failures, 0
    log.info(
        "fetching %d images (%d already cached) with %d workers",
        len(todo),
        len(sel.images) - len(todo),
        workers,
    )

    def one(iid: str, split: str) -> None:
        data = fetcher.get_bytes(url_join(images_url, f"{split}/{iid}.jpg"), max_bytes)
        imaging.check_jpeg(data)  # raises ImageError on a non-JPEG or truncated body
        write_bytes(cache / split / f"{iid}.jpg", data)

    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress.bar(total=len(todo), unit="img", desc="images", smoothing=0.1) as bar,
    ):
        pending = {pool.submit(one, iid, split): iid for iid, split in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    iid = pending.pop(fut)
                    try:
                        fut.result()
                    except NotFound as e:
                        failures[iid] = f"missing: {e}"
                    except TooLarge as e:
                        failures[iid] = f"invalid: {e} (the cap is runtime.fetch.max_image_mb)"
                    except imaging.ImageError as e:
                        failures[iid] = f"invalid: {e}"
                    except FetchError as e:
                        failures[iid] = f"failed: {e}"
                    bar.update(1)
                    bar.set_postfix(failed=len(failures), refresh=False)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failures, len(todo)


def run(cfg: DictConfig) -> dict:
    """Fetch or import the images of `data.source` into `paths.raw`; returns the metrics."""
    try:
        source = SOURCES[cfg.data.source]
    except KeyError:
        raise ConfigError(
            f"unknown data.source {cfg.data.source!r}; expected one of {sorted(SOURCES)}"
        ) from None
    return source(cfg)


def from_openimages(cfg: DictConfig) -> dict:
    """Download the configured Open Images subset; returns the metrics it wrote."""
    data, runtime = cfg.data, cfg.runtime
    classes = openimages.resolve_classes(list(data.classes))  # fails before any fetch
    fetcher = Fetcher(
        runtime.fetch.retries,
        runtime.fetch.backoff,
        runtime.fetch.timeout,
        pool=runtime.fetch.workers,
    )
    meta_cache = cache_dir(cfg, "metadata", data.metadata_url)
    img_cache = cache_dir(cfg, "images", data.images_url)
    stale = remove_stale_temps(img_cache)
    if stale:
        log.info("removed %d partial files left by an interrupted run", stale)

    with stage_run(cfg, "download") as tracker:
        tracker.log_params({"data": OmegaConf.to_container(data, resolve=True)})

        scans: dict[str, openimages.LabelScan] = {}
        for split in data.official_splits:
            rel = openimages.LABEL_FILES[split]
            f = fetcher.download_file(url_join(data.metadata_url, rel), meta_cache / rel)
            scans[split] = openimages.scan_labels(f, classes.values())
            log.info(
                "%s: %d label rows, %d images with a requested class, %d malformed rows",
                rel,
                scans[split].rows,
                len(scans[split].positives),
                scans[split].malformed,
            )

        sel = select(scans, classes, data.max_images_per_class, data.seed, data.multiclass_policy)
        if sel.empty_classes and data.on_empty_class == "error":
            raise InputError(
                f"no verified image of class(es) {sel.empty_classes} in splits "
                f"{list(data.official_splits)}; remove them from data.classes or set "
                f"data.on_empty_class=skip"
            )
        if len(sel.empty_classes) == len(classes):
            raise InputError(f"none of the classes {list(classes)} has any verified image")

        attribution: dict[str, dict[str, str]] = {}
        for split in sorted({s for s, _ in sel.images.values()}):
            rel = openimages.IMAGE_ID_FILES[split]
            f = fetcher.download_file(url_join(data.metadata_url, rel), meta_cache / rel)
            wanted = {iid for iid, (s, _) in sel.images.items() if s == split}
            attribution.update(openimages.scan_image_ids(f, wanted))

        t0 = time.perf_counter()
        failures, requested = fetch_images(
            sel,
            fetcher,
            data.images_url,
            img_cache,
            runtime.fetch.workers,
            int(runtime.fetch.max_image_mb * MB),
        )
        fetch_s = time.perf_counter() - t0
        metrics = write_outputs(cfg, sel, failures, attribution, classes, img_cache)
        metrics.update(
            {
                "images_requested": requested,
                "fetch_seconds": round(fetch_s, 3),
                "fetch_images_per_s": round(requested / fetch_s, 2) if requested else 0.0,
                "label_rows": sum(s.rows for s in scans.values()),
                "malformed_rows": sum(s.malformed for s in scans.values()),
                "bad_image_ids": sum(s.bad_ids for s in scans.values()),
                "http_retries": fetcher.retried,
            }
        )
        _finish(cfg, tracker, metrics)
    return metrics


def _finish(cfg: DictConfig, tracker: StageRun, metrics: dict) -> None:
    write_json(path(cfg, "metrics") / "download.json", metrics)
    tracker.log_metrics(metrics)
    for name in ("labels.csv", "classes.txt", "stats.csv", "missing.csv", "attribution.csv"):
        tracker.log_artifact(path(cfg, "raw") / name)


def write_outputs(
    cfg: DictConfig,
    sel: Selection,
    failures: dict[str, str],
    attribution: dict[str, dict[str, str]],
    classes: dict[str, str],
    img_cache: Path,
) -> dict:
    """Rebuild `paths.raw` whole (temp folder, then swap) from the cache and the selection."""
    ok = {iid: v for iid, v in sel.images.items() if iid not in failures}
    with atomic_dir(path(cfg, "raw")) as out:
        for iid, (split, _) in sorted(ok.items()):
            dst = out / "images" / split / f"{iid}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(img_cache / split / f"{iid}.jpg", dst)
        write_csv(
            out / "labels.csv",
            LABELS_HEADER,
            [
                (iid, s, n, classes[n], f"images/{s}/{iid}.jpg")
                for iid, (s, n) in sorted(ok.items())
            ],
        )
        write_text(out / "classes.txt", "".join(f"{c}\n" for c in classes))
        fields = openimages.ATTRIBUTION_FIELDS
        write_csv(
            out / "attribution.csv",
            ["ImageID", "split", "class", *fields],
            [
                (iid, s, n, *(attribution.get(iid, {}).get(k, "") for k in fields))
                for iid, (s, n) in sorted(ok.items())
            ],
        )
        write_csv(
            out / "missing.csv",
            ["ImageID", "split", "class", "reason"],
            [(iid, *sel.images[iid], why) for iid, why in sorted(failures.items())],
        )
        table = split_stats([(s, n) for s, n in ok.values()], list(classes))
        table = {s: table[s] for s in (*openimages.IMAGE_ID_FILES, "all") if s in table}
        write_csv(out / "stats.csv", STATS_COLUMNS, stats_rows(table))
    print(format_table(table, title="download: images per official split"))
    reasons = Counter(why.split(":", 1)[0] for why in failures.values())
    metrics = {f"{split}.{k}": v for split, row in table.items() for k, v in _flat(row).items()}
    metrics.update(
        {
            "selected": len(sel.images),
            "downloaded": len(ok),
            "missing": reasons.get("missing", 0),
            "invalid": reasons.get("invalid", 0),
            "failed": reasons.get("failed", 0),
            "multiclass_images": sel.multiclass,
            "multiclass_dropped": sel.multiclass - sel.multiclass_assigned,
            "empty_classes": len(sel.empty_classes),
            "cross_split_duplicates": sel.duplicate_ids,
            "no_attribution": sum(1 for iid in ok if iid not in attribution),
        }
    )
    if failures:
        log.warning(
            "%d of %d images could not be fetched (%s); see missing.csv. A rerun retries "
            "them (`dvc repro -f download`)",
            len(failures),
            len(sel.images),
            dict(reasons),
        )
    if sel.empty_classes:
        log.warning("skipped classes with no verified image: %s", sel.empty_classes)
    return metrics


def _flat(row: dict) -> dict:
    out = {"images": row["images"]}
    for name, (count, share) in row["classes"].items():
        out[f"{name}.count"] = count
        out[f"{name}.share_pct"] = share
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space; fall back to a copy across file systems.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- source `folder`: your own photos ----------------------------------------------------------


def photo_folder(cfg: DictConfig) -> Path:
    """`data.folder`, relative to `paths.root` unless absolute."""
    return path(cfg, "root") / cfg.data.folder


def from_folder(cfg: DictConfig) -> dict:
    """Import a class-per-folder photo set; returns the metrics it wrote."""
    data, runtime = cfg.data, cfg.runtime
    root = photo_folder(cfg)
    classes = photos.folder_classes(root, list(data.classes))
    found = list(photos.list_photos(root, classes))
    log.info("%s: %d file(s) in %d class folder(s) %s", root, len(found), len(classes), classes)

    with stage_run(cfg, "download") as tracker:
        tracker.log_params({"data": OmegaConf.to_container(data, resolve=True)})
        t0 = time.perf_counter()
        with atomic_dir(path(cfg, "raw")) as out:
            (out / "images").mkdir()
            checked = photos.import_photos(found, root, out / "images", runtime.prepare_workers)
            kept: dict[str, photos.Photo] = {}  # digest -> the first file with these bytes
            skipped: list[tuple[str, str, str]] = []
            for ph in checked:  # in list order, so "the first" is stable
                if not ph.error and ph.digest in kept:
                    ph.error = f"duplicate: same bytes as {kept[ph.digest].source}"
                if ph.error:
                    skipped.append((ph.source, ph.cls, ph.error))
                else:
                    kept[ph.digest] = ph
            ok = sorted(kept.values(), key=lambda ph: ph.digest)
            counts = Counter(ph.cls for ph in ok)
            empty = [c for c in classes if not counts[c]]
            if empty and (data.on_empty_class == "error" or len(empty) == len(classes)):
                raise InputError(
                    f"no decodable image in class folder(s) {empty} of {root}; add "
                    "photos, leave them out of data.classes or set "
                    "data.on_empty_class=skip"
                )
            write_csv(
                out / "labels.csv",
                LABELS_HEADER,
                [(ph.digest[:16], "", ph.cls, "", f"images/{ph.digest[:16]}{ph.ext}") for ph in ok],
            )
            write_text(out / "classes.txt", "".join(f"{c}\n" for c in classes))
            write_csv(
                out / "attribution.csv",
                ["ImageID", "class", "source", "sha256"],
                [(ph.digest[:16], ph.cls, ph.source, ph.digest) for ph in ok],
            )
            write_csv(out / "missing.csv", ["source", "class", "reason"], skipped)
            # one row: a photo folder has no official splits (prepare splits it)
            table = {"all": split_stats([("folder", ph.cls) for ph in ok], classes)["all"]}
            write_csv(out / "stats.csv", STATS_COLUMNS, stats_rows(table))
        import_s = time.perf_counter() - t0
        print(format_table(table, title=f"download: images per class in {root}"))
        kinds = Counter(why.split(":", 1)[0] for _, _, why in skipped)
        metrics = {f"all.{k}": v for k, v in _flat(table["all"]).items()}
        metrics.update(
            {
                "found": len(found),
                "imported": len(ok),
                "undecodable": kinds["undecodable"],
                "not_an_image": kinds["not an image"],
                "duplicates": kinds["duplicate"],
                "empty_classes": len(empty),
                "import_seconds": round(import_s, 3),
            }
        )
        if skipped:
            log.warning(
                "skipped %d of %d file(s) (%s); see missing.csv",
                len(skipped),
                len(found),
                dict(kinds),
            )
        if empty:
            log.warning("skipped class folders with no decodable image: %s", empty)
        _finish(cfg, tracker, metrics)
    return metrics


# The registry of sources (`data.source`; oipipe.core.config.CHOICES names the same keys).
SOURCES: dict[str, Callable[[DictConfig], dict]] = {
    "openimages": from_openimages,
    "folder": from_folder,
}


def main() -> None:
    cli.main("download", run)


if __name__ == "__main__":
    main()
