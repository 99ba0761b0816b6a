"""Stage `prepare`: the dataset the trainer reads (decoded once, EXIF-rotated, resized, split).

It reads only what `download` wrote (labels.csv, classes.txt, the images), so it is the same for
every source: a photo folder's images simply have no official split. Inputs, outputs, settings
and exit codes: docs/stages/prepare.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from omegaconf import DictConfig, OmegaConf

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import InputError
from oipipe.core.files import atomic_dir, read_csv, write_csv, write_json, write_text
from oipipe.core.tracking import stage_run
from oipipe.data import imaging
from oipipe.data.sampling import rank
from oipipe.data.split_counts import STATS_COLUMNS, format_table, split_stats, stats_rows

log = logging.getLogger("stages.prepare")

SPLITS = ("train", "val", "test")
OFFICIAL_TO_SPLIT = {"train": "train", "validation": "val", "test": "test"}
JPEG_QUALITY = 90


def allocate(n: int, ratios: dict[str, float]) -> dict[str, int]:
    """Split n items by ratios (largest remainder), giving every split with a positive ratio at
    least one item when n allows, so no class is absent from val or test by rounding alone."""
    exact = {s: n * ratios[s] for s in SPLITS}
    counts = {s: int(exact[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: exact[s] - counts[s], reverse=True)
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    wanted = [s for s in SPLITS if ratios[s] > 0]
    if n >= len(wanted):
        for s in wanted:
            if counts[s] == 0:
                donor = max(SPLITS, key=counts.__getitem__)
                counts[donor] -= 1
                counts[s] += 1
    return counts


def assign_splits(
    rows: Sequence[dict], classes: Sequence[str], mode: str, ratios: dict[str, float], seed: int
) -> dict[str, str]:
    """ImageID -> train/val/test."""
    if mode == "official":
        return {r["ImageID"]: OFFICIAL_TO_SPLIT[r["split"]] for r in rows}
    out: dict[str, str] = {}
    for name in classes:
        ids = sorted(
            (r["ImageID"] for r in rows if r["class"] == name), key=lambda i: rank(seed, i, "split")
        )
        start = 0
        for split, k in allocate(len(ids), ratios).items():
            out.update({i: split for i in ids[start : start + k]})
            start += k
    return out


def _process(args: tuple[str, str, int]) -> str | None:
    """Decode, orient, resize and store one image; returns an error message or None."""
    src, dst, short = args
    try:
        im = imaging.resize_short_side(imaging.decode(src), short)
    except imaging.ImageError as e:
        return str(e)
    except FileNotFoundError:
        return "file missing from the download output"
    im.save(dst, "JPEG", quality=JPEG_QUALITY)
    return None


def run(cfg: DictConfig) -> dict:
    """Split, decode and resize the downloaded subset; returns the metrics it wrote."""
    data, runtime = cfg.data, cfg.runtime
    raw = path(cfg, "raw")
    labels_csv = raw / "labels.csv"
    if not labels_csv.is_file():
        raise InputError(
            f"{labels_csv} not found: run the download stage first "
            "(`dvc repro download` or `python -m stages.download`)"
        )
    classes_txt = raw / "classes.txt"
    if not classes_txt.is_file():  # a raw folder from before download wrote it
        raise InputError(
            f"{classes_txt} not found: rerun the download stage (`dvc repro -f download`)"
        )
    rows = read_csv(labels_csv)
    # "" = no official split (a photo folder), fine when re-splitting
    splits = {*OFFICIAL_TO_SPLIT, *([""] if data.split.mode == "resplit" else [])}
    bad = [
        r for r in rows if r.get("split") not in splits or not r.get("class") or not r.get("file")
    ]
    if bad:
        raise InputError(
            f"{labels_csv}: {len(bad)} row(s) without a valid split/class/file "
            f"(data.split.mode={data.split.mode}), first: {bad[0]}"
        )
    # The label order download recorded (the order of data.classes, or the sorted class folders)
    present = {r["class"] for r in rows}
    classes = [c for c in classes_txt.read_text(encoding="utf-8").splitlines() if c in present]
    if not classes:
        raise InputError(f"{labels_csv} has no image of any class in {classes_txt}")

    with stage_run(cfg, "prepare") as tracker:
        tracker.log_params(
            {
                "data.image_size": data.image_size,
                "data.seed": data.seed,
                "data.split": OmegaConf.to_container(data.split),
            }
        )
        with atomic_dir(path(cfg, "prepared")) as out:
            (out / "images").mkdir()
            jobs = [
                (str(raw / r["file"]), str(out / "images" / f"{r['ImageID']}.jpg"), data.image_size)
                for r in rows
            ]
            errors = _run_jobs(jobs, runtime.prepare_workers)
            skipped = {r["ImageID"]: e for r, e in zip(rows, errors, strict=True) if e}
            good = [r for r in rows if r["ImageID"] not in skipped]
            split_of = assign_splits(
                good, classes, data.split.mode, dict(data.split.ratios), data.seed
            )
            index = {name: i for i, name in enumerate(classes)}
            for split in SPLITS:
                write_csv(
                    out / f"{split}.csv",
                    ["file", "label", "class", "image_id", "official_split"],
                    [
                        (
                            f"images/{r['ImageID']}.jpg",
                            index[r["class"]],
                            r["class"],
                            r["ImageID"],
                            r["split"],
                        )
                        for r in good
                        if split_of[r["ImageID"]] == split
                    ],
                )
            write_text(out / "labels.txt", "".join(f"{c}\n" for c in classes))
            write_csv(out / "skipped.csv", ["ImageID", "reason"], sorted(skipped.items()))
            table = split_stats([(split_of[r["ImageID"]], r["class"]) for r in good], classes)
            table = {s: table[s] for s in (*SPLITS, "all") if s in table}
            write_csv(out / "stats.csv", STATS_COLUMNS, stats_rows(table))
        print(format_table(table, title=f"prepare: images per split ({data.split.mode})"))
        if skipped:
            log.warning("skipped %d undecodable image(s); see skipped.csv", len(skipped))
        metrics = {f"{s}.images": row["images"] for s, row in table.items()}
        metrics.update(
            {
                f"{s}.{name}.{k}": v
                for s, row in table.items()
                for name, (count, share) in row["classes"].items()
                for k, v in (("count", count), ("share_pct", share))
            }
        )
        metrics.update({"classes": len(classes), "skipped_undecodable": len(skipped)})
        write_json(path(cfg, "metrics") / "prepare.json", metrics)
        tracker.log_metrics(metrics)
        for name in ("stats.csv", "labels.txt", "skipped.csv"):
            tracker.log_artifact(path(cfg, "prepared") / name)
    return metrics


def _run_jobs(jobs: list[tuple[str, str, int]], workers: int) -> list[str | None]:
    # Threads, not processes: Pillow releases the GIL while it decodes, resizes and encodes, so
    # threads use every core without pickling, spawn start-up or fork-with-threads hazards.
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        progress.bar(total=len(jobs), unit="img", desc="prepare") as bar,
    ):
        results = []
        for res in pool.map(_process, jobs):
            results.append(res)
            bar.update(1)
        return results


def main() -> None:
    cli.main("prepare", run)


if __name__ == "__main__":
    main()
