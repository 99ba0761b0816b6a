"""Stage `report`: one readable summary of a pipeline run, from the files the stages wrote.

Both documents (REPORT.md and the self-contained REPORT.html) are rendered from one list of
blocks (`oipipe.reporting.document`, shared with `oitools.compare`), by one template each, so the
two never drift. Only a missing `train.json` is an error; a section whose stage has not run says
so. Nothing here imports torch: the report reads files. What it reads and writes:
docs/stages/report.md.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from oipipe.core import cli
from oipipe.core.config import path
from oipipe.core.errors import InputError
from oipipe.core.files import read_csv, write_text
from oipipe.core.tracking import git_commit, stage_run
from oipipe.core.version import project_version
from oipipe.measure.machine import machine_info
from oipipe.reporting import compression
from oipipe.reporting.document import (
    DASH,
    Block,
    Bullets,
    Heading,
    Image,
    Para,
    Table,
    accuracy_text,
    num,
    render_html,
    render_markdown,
)
from oipipe.reporting.plots import figure

log = logging.getLogger("stages.report")

SPLITS = ("train", "val", "test")
BENCHMARK_CHARTS = {  # file under paths.plots: caption
    "benchmark_throughput.png": "benchmark throughput",
    "benchmark_latency.png": "benchmark latency",
    "benchmark_speedup.png": "benchmark speedup",
    "pareto.png": "throughput against top-1 (95% intervals) at the reference batch, "
    "the Pareto frontier drawn",
}
BASELINE = "eager_fp32"  # the benchmark's channels_last eager row
BASELINE_NCHW = "eager_fp32_nchw"  # the benchmark's NCHW twin of its channels_last baseline


# --- reading and formatting --------------------------------------------------------------------


def read_json(file: Path, stage: str) -> dict | None:
    """The JSON a stage wrote, or None when that stage has not run."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{file} is not valid JSON ({e}): rerun the {stage} stage (`dvc repro -f {stage}`)"
        ) from e


def rel(cfg: DictConfig, file: Path) -> str:
    """`file` relative to `paths.root`: what a reader of the report can find in the checkout."""
    try:
        return file.relative_to(path(cfg, "root")).as_posix()
    except ValueError:
        return str(file)


def percent_text(value_pct: Any, digits: int = 1) -> str:
    """A `_pct` figure as text: `12.5%`."""
    return DASH if value_pct is None else f"{float(value_pct):.{digits}f}%"


def points(delta: Any, low: Any, high: Any) -> str:
    """A difference in accuracy points with its interval: `-1.25 [-3.10, +0.40]`."""
    if delta is None:
        return DASH
    text = f"{float(delta):+.2f}"
    return text + (
        f" [{float(low):+.2f}, {float(high):+.2f}]" if low is not None and high is not None else ""
    )


def p_value(p: Any) -> str:
    if p is None:
        return DASH
    return "<0.001" if float(p) < 0.001 else f"{float(p):.2g}"


def first_line(text: Any, limit: int = 300) -> str:
    """The first line of an error, shortened: records keep up to 2000 characters of it, which
    would make a table unreadable; the full text stays in the record file."""
    lines = str(text or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def not_run(what: str, stage: str) -> Para:
    return Para(f"**Not run.** No {what}: run the {stage} stage (`dvc repro {stage}`).")


# --- sections ----------------------------------------------------------------------------------


def dataset_section(cfg: DictConfig) -> tuple[list[Block], dict, dict[str, Counter]]:
    """The dataset blocks, their summary, and the images per class of each split."""
    prepared, metrics, raw = path(cfg, "prepared"), path(cfg, "metrics"), path(cfg, "raw")
    blocks: list[Block] = [Heading(2, "Dataset")]
    labels = prepared / "labels.txt"
    classes = labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else []
    prep = read_json(metrics / "prepare.json", "prepare")
    if classes:
        blocks.append(
            Para(
                f"{len(classes)} classes, in label order: "
                + ", ".join(f"`{c}`" for c in classes)
                + "."
            )
        )

    # The CSVs are what training read; prepare.json is their summary and only the fallback.
    csvs = {s: prepared / f"{s}.csv" for s in SPLITS}
    counts: dict[str, Counter] = {}
    source = ""
    if all(f.is_file() for f in csvs.values()):
        counts = {s: Counter(r["class"] for r in read_csv(f)) for s, f in csvs.items()}
        source = f"rows of `{rel(cfg, prepared)}/{{train,val,test}}.csv`"
    elif prep is not None:
        counts = {s: Counter({c: prep.get(f"{s}.{c}.count", 0) for c in classes}) for s in SPLITS}
        source = f"`{rel(cfg, metrics / 'prepare.json')}` (the split CSVs are missing)"
    if counts:
        names = classes or sorted(set().union(*counts.values()))
        rows = [
            [c, *(str(counts[s][c]) for s in SPLITS), str(sum(counts[s][c] for s in SPLITS))]
            for c in names
        ]
        totals = [sum(counts[s].values()) for s in SPLITS]
        rows.append(["all classes", *map(str, totals), str(sum(totals))])
        blocks += [
            Para(f"Images per split ({source}):"),
            Table(["class", *SPLITS, "total"], rows, numeric={1, 2, 3, 4}),
        ]
        notes = []
        for s, n in zip(SPLITS, totals, strict=True):
            said = (prep or {}).get(f"{s}.images")
            if said is not None and said != n:
                notes.append(f"`prepare.json` says {said} {s} images, `{s}.csv` has {n} rows")
        if prep is not None and prep.get("skipped_undecodable"):
            notes.append(
                f"{prep['skipped_undecodable']} downloaded image(s) could not be decoded "
                f"and were left out (see `{rel(cfg, prepared)}/skipped.csv`)"
            )
        if notes:
            blocks.append(Bullets(notes))
    else:
        blocks.append(not_run("prepared splits", "prepare"))

    blocks += [Heading(3, "Source and licences"), Para(source_text(cfg))]
    attribution = raw / "attribution.csv"
    n_attr = None
    if attribution.is_file():
        attributed = read_csv(attribution)
        n_attr = len(attributed)
        licences = Counter(r.get("License") or "(none recorded)" for r in attributed)
        blocks += [
            Para(f"`{rel(cfg, attribution)}` lists {n_attr} image(s), by licence:"),
            Table(
                ["licence", "images"], [[k, str(v)] for k, v in licences.most_common()], numeric={1}
            ),
        ]
    else:
        blocks.append(not_run("attribution manifest", "download"))

    blocks += download_blocks(cfg, read_json(metrics / "download.json", "download"))
    return (
        blocks,
        {
            "classes": len(classes),
            "images": {s: sum(c.values()) for s, c in counts.items()},
            "attribution_rows": n_attr,
        },
        counts,
    )


def download_counts(download: dict) -> dict[str, dict[str, int]]:
    """Images per class of each split (`train`, `validation`, `test`, `all`; a photo folder has
    only `all`), from download.json's flat `<split>.images` and `<split>.<class>.count` keys."""
    counts: dict[str, dict[str, int]] = {
        k.removesuffix(".images"): {}
        for k in download
        if k.endswith(".images") and k.count(".") == 1
    }
    for key, v in download.items():
        split, _, rest = key.partition(".")
        if split in counts and rest.endswith(".count"):
            counts[split][rest.removesuffix(".count")] = v
    return counts


# download.json's figures on the report's one fetch (or, for a photo folder, import) line.
FETCH_FIGURES = {
    "selected": "selected",
    "downloaded": "downloaded",
    "missing": "missing",
    "invalid": "invalid",
    "failed": "failed",
    "http_retries": "HTTP retries",
}
IMPORT_FIGURES = {
    "found": "files found",
    "imported": "imported",
    "undecodable": "undecodable",
    "not_an_image": "not an image",
    "duplicates": "duplicates",
}


def download_blocks(cfg: DictConfig, download: dict | None) -> list[Block]:
    """What the download stage fetched: images per class and official split, then one line of
    fetch figures. Every figure stays in download.json; the table shows its counts, not shares."""
    blocks: list[Block] = [Heading(3, "Download")]
    if download is None:
        return [*blocks, not_run("download metrics", "download")]
    file = rel(cfg, path(cfg, "metrics") / "download.json")
    counts = download_counts(download)
    splits = [s for s in counts if s != "all"]
    if counts:
        names = list(dict.fromkeys(c for per_class in counts.values() for c in per_class))
        columns = {
            **{s: s for s in splits},
            **({"all": "total" if splits else "images"} if "all" in counts else {}),
        }
        rows = [[c, *(num(counts[s].get(c, 0)) for s in columns)] for c in names]
        rows.append(["all classes", *(num(download[f"{s}.images"]) for s in columns)])
        blocks += [
            Para(
                f"Images per {'official Open Images split' if splits else 'class folder'}"
                f" (`{file}` keeps every figure the stage recorded):"
            ),
            Table(["class", *columns.values()], rows, numeric=set(range(1, len(columns) + 1))),
        ]
    missing = rel(cfg, path(cfg, "raw") / "missing.csv")
    if "found" in download:  # data.source=folder: photos imported, nothing fetched
        line = ", ".join(
            f"{num(download[k])} {w}" for k, w in IMPORT_FIGURES.items() if k in download
        )
        seconds = download.get("import_seconds")
        return [
            *blocks,
            Para(
                f"**Import:** {line}"
                + (f", in {num(seconds)} s" if seconds is not None else "")
                + f" (each file skipped is listed in `{missing}`)."
            ),
        ]
    line = ", ".join(f"{num(download[k])} {w}" for k, w in FETCH_FIGURES.items() if k in download)
    rate = (
        f"; {num(download.get('images_requested'))} requested in "
        f"{num(download.get('fetch_seconds'))} s, {num(download['fetch_images_per_s'], 1)} "
        "images/s"
        if "fetch_images_per_s" in download
        else ""
    )
    return [
        *blocks,
        Para(f"**Fetch:** {line}{rate} (each image left out is listed in `{missing}`)."),
    ]


def source_text(cfg: DictConfig) -> str:
    """Where the images came from and under which licences, by `data.source`."""
    if cfg.data.source == "folder":
        return (
            f"Images come from the class-per-folder photo set `{cfg.data.folder}` (one "
            "sub-folder per class). Their licences are their owners'; the pipeline records "
            "each file's source path in the attribution manifest, not a licence."
        )
    return (
        "Images and labels come from [Open Images V7](https://storage.googleapis.com/"
        "openimages/web/index.html) (Google LLC). The annotations and the class list are "
        "licensed under [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/); each image "
        "is licensed by its author, as listed per image in the attribution manifest (Open "
        "Images images are [CC BY 2.0](https://creativecommons.org/licenses/by/2.0/))."
    )


def training_curves(history: list[dict[str, str]], best_epoch: int | None, file: Path) -> None:
    """Loss and accuracy per epoch, train beside val, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    def col(name: str) -> list[float]:
        return [float(h[name]) if h.get(name) not in (None, "") else float("nan") for h in history]

    epochs = col("epoch")
    with figure(file, 1, 2, figsize=(10, 3.6)) as (loss_ax, acc_ax):
        for ax, what in ((loss_ax, "loss"), (acc_ax, "acc_pct")):
            ax.plot(epochs, col(f"train_{what}"), "o-", label="train")
            ax.plot(epochs, col(f"val_{what}"), "o-", label="val")
            if best_epoch:
                ax.axvline(
                    best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})"
                )
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title("loss" if what == "loss" else "accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend()


SELECTED_BY = {"val_loss": "lowest validation loss", "val_acc": "highest validation accuracy"}


def training_section(
    cfg: DictConfig, train: dict, test_counts: Counter | None = None
) -> tuple[list[Block], dict]:
    plots, reports = path(cfg, "plots"), path(cfg, "reports")
    t = cfg.train
    test_acc = accuracy_text(
        train.get("test_acc_pct"),
        train.get("test_acc_ci_low_pct"),
        train.get("test_acc_ci_high_pct"),
        train.get("test_images"),
    )
    val_acc = accuracy_text(
        train.get("best_val_acc_pct"),
        train.get("val_acc_ci_low_pct"),
        train.get("val_acc_ci_high_pct"),
        train.get("val_images"),
    )
    by = train.get("selected_by")
    selected = DASH
    if by is not None:
        selected = by if by not in SELECTED_BY else f"{SELECTED_BY[by]} ({by})"
        if by == "val_loss" and train.get("best_val_loss") is not None:
            selected += f": {num(train['best_val_loss'])}"
        selected += f", epoch {num(train.get('best_epoch'))}"
    rows = [
        ["model", str(cfg.model.name)],
        [
            "recipe",
            f"{t.recipe}, {t.optimizer}, lr {t.lr:g}, precision "
            + (
                f"{train['precision']} ({t.precision}: {train.get('precision_chosen_by')})"
                if train.get("precision") and train["precision"] != t.precision
                else str(t.precision)
            ),
        ],
        [
            "epochs run / configured",
            f"{num(train.get('epochs_run'))} / {num(train.get('epochs_configured', t.epochs))}",
        ],
        ["batch size", num(train.get("batch_size", t.batch_size))],
        ["checkpoint selected by", selected],
        ["validation accuracy at that epoch", f"{val_acc} (epoch {num(train.get('best_epoch'))})"],
        ["test accuracy", test_acc],
        ["wall time", num(train.get("wall_time_s"), 1, " s")],
        ["training throughput", num(train.get("train_images_per_s"), 1, " images/s")],
    ]
    blocks: list[Block] = [
        Heading(2, "Training"),
        Table(["", "value"], rows),
        Para("Accuracies with their 95% Wilson interval and number of images."),
    ]
    per_class: dict[str, dict[str, Any]] = {}
    for key, v in train.items():
        for m in ("precision_pct", "recall_pct"):
            if key.startswith("test.") and key.endswith(f".{m}"):
                per_class.setdefault(key[len("test.") : -len(m) - 1], {})[m] = v
    if per_class:
        # Recall is the accuracy on a class's test images, so it gets their count and interval;
        # precision's denominator (images predicted as the class) is not recorded.
        counts = test_counts or Counter()
        rows = [
            [
                c,
                num(counts.get(c)) if c in counts else DASH,
                percent_text(v.get("precision_pct")),
                accuracy_text(v.get("recall_pct"), n=counts.get(c)),
            ]
            for c, v in per_class.items()
        ]
        blocks += [
            Para("Per class, on the test split:"),
            Table(["class", "test images", "precision", "recall"], rows, numeric={1, 2}),
        ]

    history_file = plots / "train_history.csv"
    history = read_csv(history_file) if history_file.is_file() else []
    curves = None
    if history:
        curves = reports / "training_curves.png"
        training_curves(history, train.get("best_epoch"), curves)
        blocks.append(Image(curves, "training and validation loss and accuracy per epoch"))
    else:
        blocks.append(
            Para(
                f"No training history (`{rel(cfg, history_file)}` is missing or "
                "empty): rerun the train stage to draw the curves."
            )
        )
    confusion = plots / "confusion.png"
    if confusion.is_file():
        blocks.append(Image(confusion, "confusion matrix on the test split"))
    return blocks, {
        "test_acc_pct": train.get("test_acc_pct"),
        "best_val_acc_pct": train.get("best_val_acc_pct"),
        "test": test_acc,
        "val": val_acc,
        "selected_by": by,
        "curves": str(curves) if curves else None,
    }


def verdict_cell(r: dict) -> str:
    """`pass (bar 1.5)`; an undecided verdict also says how many images would decide it."""
    v = r.get("verdict")
    if v is None:
        return DASH
    text = f"{v} (bar {num(r.get('accuracy_bar_pct'))})"
    if v == "undecided":
        need = r.get("images_to_decide")
        text += (
            f": about {need} images would decide" if need else ": no number of images would decide"
        )
    return text


def read_optimize_records(cfg: DictConfig) -> list[dict]:
    """Every optimize record, configured order first, then records of variants since dropped."""
    folder = path(cfg, "metrics") / "optimize"
    found = (read_json(f, "optimize") for f in sorted(folder.glob("*.json")))
    records = [r for r in found if r is not None]  # None: a file removed while listing
    configured = list(cfg.optimize.variants)
    records.sort(
        key=lambda r: (
            configured.index(r["variant"]) if r.get("variant") in configured else len(configured),
            str(r.get("variant")),
        )
    )
    return records


def evaluated_on(records: list[dict]) -> list[str]:
    """One sentence per distinct (splits, images) the ok records were evaluated on."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            key = (tuple(r.get("eval_splits") or ()), r.get("eval_images"), r.get("fp32_top1_pct"))
            groups.setdefault(key, []).append(r)
    out = []
    for (splits, n, fp32), rs in groups.items():
        names = ", ".join(f"`{r.get('variant')}`" for r in rs)
        where = (
            " + ".join(splits) + " split" + ("s" if len(splits) > 1 else "")
            if splits
            else "(splits not recorded)"
        )
        out.append(
            f"{names} and the fp32 model were evaluated on the same {num(n)} images of "
            f"the {where}; fp32 top-1 {accuracy_text(fp32, n=n)}."
        )
    return out


def optimize_section(cfg: DictConfig, records: list[dict]) -> tuple[list[Block], dict]:
    folder = path(cfg, "metrics") / "optimize"
    blocks: list[Block] = [Heading(2, "Optimization")]
    if not records:
        blocks.append(not_run(f"records in `{rel(cfg, folder)}`", "optimize"))
        return blocks, {"variants": {}, "verdicts": {}}
    rows, kinds = [], []
    for r in records:
        status = r.get("status") or "unknown"
        note = {"skipped": r.get("reason"), "failed": first_line(r.get("error"))}.get(status)
        ok = status == "ok"
        discordant = (
            f"{num(r.get('discordant_worse'))} / {num(r.get('discordant_better'))}" if ok else DASH
        )
        rows.append(
            [
                str(r.get("variant")),
                str(r.get("backend", DASH)),
                str(r.get("precision", DASH)),
                status,
                num(r.get("size_mb"), 1),
                num(r.get("build_seconds"), 1),
                accuracy_text(
                    r.get("top1_pct"),
                    r.get("top1_ci_low_pct"),
                    r.get("top1_ci_high_pct"),
                    r.get("eval_images"),
                ),
                points(
                    r.get("top1_delta_pct"),
                    r.get("top1_delta_ci_low_pct"),
                    r.get("top1_delta_ci_high_pct"),
                ),
                verdict_cell(r),
                accuracy_text(
                    r.get("agreement_pct"),
                    r.get("agreement_ci_low_pct"),
                    r.get("agreement_ci_high_pct"),
                ),
                discordant,
                p_value(r.get("mcnemar_p")),
                note or "",
            ]
        )
        kinds.append(status if not ok else f"verdict-{r.get('verdict')}")
    blocks += [
        Para(" ".join(evaluated_on(records))),
        Para(
            "Top-1 with its 95% Wilson interval and number of images. Δ is the variant "
            "minus fp32 in points, with the paired 95% interval (the same images, so the "
            "noise they share cancels); worse / better count the images fp32 got right "
            "and the variant wrong, and the reverse; McNemar p is exact, two-sided. "
            "Verdict against the precision's bar: **fail** when the whole interval lies "
            "below −bar, **pass** when the variant is at least as good on these images or "
            "the whole interval lies above −bar, **undecided** otherwise."
        ),
        Table(
            [
                "variant",
                "backend",
                "precision",
                "status",
                "size (MB)",
                "build (s)",
                "top-1",
                "Δ top-1 vs fp32 (points)",
                "verdict",
                "agreement",
                "worse / better",
                "McNemar p",
                "reason / error",
            ],
            rows,
            numeric={4, 5},
            row_class=kinds,
        ),
    ]
    reasons = [
        f"`{r.get('variant')}`: **{r['verdict']}**, {r['verdict_reason']}"
        for r in records
        if r.get("status") == "ok"
        and r.get("verdict") in ("fail", "undecided")
        and r.get("verdict_reason")
    ]
    if reasons:
        blocks.append(Bullets(reasons))
    configured = list(cfg.optimize.variants)
    done = {r.get("variant") for r in records}
    missing = [v for v in configured if v not in done]
    if missing:
        blocks.append(
            Para(
                "Configured but not run: "
                + ", ".join(f"`{v}`" for v in missing)
                + " (`dvc repro optimize`)."
            )
        )
    return blocks, {
        "variants": {str(r.get("variant")): r.get("status") for r in records},
        "verdicts": {
            str(r.get("variant")): r.get("verdict") for r in records if r.get("status") == "ok"
        },
    }


def baseline_of(bench: dict, batch: int | None = None) -> str:
    """The variant the speed-ups at `batch` divide by: the faster eager layout there (older
    benchmarks name one baseline for every batch size)."""
    per_batch = bench.get("baselines") or {}
    return per_batch.get(str(batch)) or bench.get("baseline") or "eager_fp32"


def baseline_name(bench: dict, batch: int | None = None) -> str:
    """What the speed-ups at `batch` divide by, in words: the layout and the variant."""
    baseline = baseline_of(bench, batch)
    twin = any(r.get("variant") == BASELINE_NCHW for r in bench.get("rows", {}).values())
    layout = "NCHW " if baseline == BASELINE_NCHW else "channels_last " if twin else ""
    return f"{layout}eager fp32 (`{baseline}`)"


def threads_text(bench: dict) -> str:
    reason = bench.get("threads_reason")
    return f"{num(bench.get('threads'))} thread(s)" + (f" ({reason})" if reason else "")


def load_text(bench: dict) -> str:
    """The machine's load averages before and after the timing, when recorded."""
    before, after = bench.get("load_before"), bench.get("load_after")
    if not before or not after:
        return ""
    return (
        f" The machine's 1-minute load average was {before[0]:.2f} before the timing and "
        f"{after[0]:.2f} after."
    )


def winners(bench: dict) -> dict[int, dict]:
    """The benchmark's winner per batch size: the fastest variant whose verdict is not `fail`."""
    return {int(b): w or {"variant": None} for b, w in (bench.get("winners") or {}).items()}


def winner_text(w: dict, batch: int, bench: dict, records: dict[str, dict]) -> tuple[str, str]:
    """(what, figures) for the winner at one batch size: `x` (accuracy undecided), and its
    throughput, p99, accuracy and speed-up against the named baseline."""
    v, baseline = w.get("variant"), baseline_of(bench, batch)
    what = f"`{v}`" + (" (accuracy undecided)" if w.get("verdict") == "undecided" else "")
    acc = accuracy_text(
        w.get("top1_pct"), w.get("top1_ci_low_pct"), w.get("top1_ci_high_pct"), w.get("eval_images")
    )
    figures = (
        f"{num(w.get('throughput'), 1)} images/s, p99 latency "
        f"{num(w.get('latency_p99_ms'), 2)} ms, top-1 {acc}"
    )
    sp = w.get("speedup")
    if v in (baseline, BASELINE, BASELINE_NCHW):
        figures += (
            f"; no variant that holds its accuracy beat the baseline, {baseline_name(bench, batch)}"
        )
    elif sp is not None:
        figures += f"; {sp:.1f}× the throughput of {baseline_name(bench, batch)} at batch {batch}"
    if w.get("tied_with"):
        figures += (
            "; its speed ties with "
            + ", ".join(f"`{t}`" for t in w["tied_with"])
            + " (their per-round speeds are not told apart, or are within "
            f"{num(bench.get('tie_margin_pct'))}%), so it is chosen for its verdict, then its "
            "top-1, then its size"
        )
    if w.get("verdict") == "undecided":
        need = (records.get(str(v)) or {}).get("images_to_decide")
        figures += (
            f"; about {need} images at the same rates would decide its accuracy (it was "
            f"measured on {num(w.get('eval_images'))})"
            if need
            else "; see Optimization for why its accuracy is undecided"
        )
    return what, figures


def ship_blocks(
    cfg: DictConfig, bench: dict | None, records: list[dict]
) -> tuple[list[Block], list[str], dict | None]:
    """The report's first lines: what to ship at the reference batch size and what it gives,
    and one line per other batch size."""
    bench_file = f"`{rel(cfg, path(cfg, 'metrics') / 'benchmark.json')}`"
    if bench is None:
        return (
            [
                Para(
                    f"**Nothing to ship yet.** No {bench_file}: run the benchmark stage "
                    "(`dvc repro benchmark`; it builds the optimized variants first)."
                )
            ],
            [],
            None,
        )
    wins = winners(bench)
    if not wins:
        return (
            [
                Para(
                    f"**No winner recorded.** {bench_file} has no `winners` (an older benchmark "
                    "wrote it): rerun the benchmark (`dvc repro -f benchmark`)."
                )
            ],
            [],
            None,
        )
    ref = bench.get("reference_batch")
    ref = ref if ref in wins else max(wins)
    by_record = {str(r.get("variant")): r for r in records}
    w = wins[ref]
    if w.get("variant") is None:
        head = (
            f"**Nothing to ship at batch {ref}**: no variant finished there (see Benchmark "
            "for the errors)."
        )
    else:
        what, figures = winner_text(w, ref, bench, by_record)
        head = f"**Ship {what} at batch {ref}**: {figures}."
    others = []
    for batch in sorted(b for b in wins if b != ref):
        o = wins[batch]
        if o.get("variant") is None:
            others.append(f"At batch {batch}: no variant finished.")
        else:
            what, figures = winner_text(o, batch, bench, by_record)
            others.append(f"At batch {batch}: {what}, {figures}.")
    return [Para(head)], others, {"batch": ref, **w}


def benchmark_section(cfg: DictConfig, bench: dict | None) -> tuple[list[Block], dict]:
    metrics, plots = path(cfg, "metrics"), path(cfg, "plots")
    blocks: list[Block] = [Heading(2, "Benchmark")]
    if bench is None:
        blocks.append(not_run(f"`{rel(cfg, metrics / 'benchmark.json')}`", "benchmark"))
        return blocks, {"best_variant": None, "best_speedup": None}
    rows = list(bench["rows"].values())
    ref, best, speedup = (
        bench.get("reference_batch"),
        bench.get("best_variant"),
        bench.get("best_speedup"),
    )
    baseline = bench.get("baseline", "the baseline")
    blocks.append(
        Para(
            f"Protocol `{bench.get('protocol', DASH)}` on "
            f"{bench.get('device', DASH)} with {threads_text(bench)}; every variant was "
            "loaded in its own process and timed in turn, round after round, so a noisy "
            "minute slows every row of its round; throughput is the median over rounds and "
            "a speed-up the median of per-round ratios. The baseline at each batch size is "
            "the faster eager fp32 layout there under `torch.inference_mode`, PyTorch's own "
            "advice for inference: "
            + ", ".join(
                f"batch {b} {baseline_name(bench, int(b))}"
                for b in sorted((bench.get("baselines") or {}), key=int)
            )
            + "."
            + load_text(bench)
        )
    )
    throughput = {
        (r.get("variant"), r.get("batch")): r.get("throughput")
        for r in rows
        if r.get("status") == "ok" and r.get("throughput")
    }
    gains = [
        f"{throughput[BASELINE, b] / t:.2f}× at batch {b}"
        for (v, b), t in sorted(throughput.items(), key=lambda kv: kv[0][1])
        if v == BASELINE_NCHW and (BASELINE, b) in throughput
    ]
    if gains:
        blocks.append(
            Para(
                f"`{BASELINE_NCHW}` is the same model in PyTorch's default NCHW "
                f"layout. Throughput of channels_last (`{BASELINE}`) over NCHW: "
                + ", ".join(gains)
                + "."
            )
        )
    wins = winners(bench)
    if wins:
        said = [
            f"batch {b} **{w['variant']}**"
            + (" (undecided)" if w.get("verdict") == "undecided" else "")
            if w.get("variant")
            else f"batch {b} none"
            for b, w in sorted(wins.items())
        ]
        blocks.append(
            Para(
                "Winner at each batch size (the fastest variant whose accuracy verdict "
                "is not `fail`): " + ", ".join(said) + "."
            )
        )
    # Grouped by batch size so rows that compare sit together; the file's order within a batch.
    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("batch") or 0, i))
    table, kinds = [], []
    for i in order:
        r = rows[i]
        status = r.get("status") or "unknown"
        sp = r.get("speedup")
        table.append(
            [
                str(r.get("variant")),
                status,
                num(r.get("batch")),
                num(r.get("throughput"), 1),
                num(r.get("latency_p50_ms"), 2),
                num(r.get("latency_p99_ms"), 2),
                f"{sp:.2f}×" if sp is not None else DASH,
                accuracy_text(
                    r.get("top1_pct"),
                    r.get("top1_ci_low_pct"),
                    r.get("top1_ci_high_pct"),
                    r.get("eval_images"),
                ),
                str(r.get("verdict") or DASH),
                num(r.get("size_mb"), 1),
                num(r.get("build_seconds"), 1),
                first_line(r.get("error")),
            ]
        )
        kinds.append(status)
    blocks.append(
        Table(
            [
                "variant",
                "status",
                "batch",
                "throughput (img/s)",
                "p50 (ms)",
                "p99 (ms)",
                "speed-up",
                "top-1",
                "verdict",
                "size (MB)",
                "build (s)",
                "error",
            ],
            table,
            numeric={2, 3, 4, 5, 6, 9, 10},
            row_class=kinds,
        )
    )
    for name, caption in BENCHMARK_CHARTS.items():
        chart = plots / name
        if chart.is_file():
            blocks.append(Image(chart, caption))
        if name == "pareto.png":
            blocks += pareto_table(rows, ref)
    blocks += roofline_blocks(bench, rows, plots)
    return blocks, {
        "best_variant": best,
        "best_speedup": speedup,
        "baseline": baseline,
        "best_verdict": bench.get("best_verdict"),
        "reference_batch": ref,
        "rows": len(rows),
    }


def pareto_table(rows: list[dict], ref: int | None) -> list[Block]:
    """The chart's points as a table beside it, fastest first: what the labels say, readable."""
    points = sorted(
        (r for r in rows if r.get("batch") == ref and r.get("status") == "ok"),
        key=lambda r: -(r.get("throughput") or 0),
    )
    if not points:
        return []
    table = [
        [
            str(r.get("variant")),
            num(r.get("throughput"), 1),
            accuracy_text(
                r.get("top1_pct"),
                r.get("top1_ci_low_pct"),
                r.get("top1_ci_high_pct"),
                r.get("eval_images"),
            ),
            str(r.get("verdict") or DASH),
            "yes" if on_frontier(r, points) else "no",
        ]
        for r in points
    ]
    return [
        Table(
            [
                "variant",
                f"throughput at batch {ref} (img/s)",
                "top-1",
                "verdict",
                "on the frontier",
            ],
            table,
            numeric={1},
        )
    ]


def on_frontier(r: dict, points: list[dict]) -> bool:
    """No other point at least as fast and as accurate, and better in one (pareto's rule)."""
    t, a = r.get("throughput") or 0, r.get("top1_pct") or 0
    return not any(
        (q.get("throughput") or 0) >= t
        and (q.get("top1_pct") or 0) >= a
        and ((q.get("throughput") or 0) > t or (q.get("top1_pct") or 0) > a)
        for q in points
    )


def roofline_blocks(bench: dict, rows: list[dict], plots: Path) -> list[Block]:
    """How far from the limit: the machine's measured peaks and each row's share of its own."""
    peaks = bench.get("peaks") or {}
    if not peaks:
        return []
    said = []
    for device, got in sorted(peaks.items()):
        parts = [
            f"{label} {num(got.get(key), 1)}"
            for key, label in (
                ("fp32_gflops", "fp32 GFLOP/s"),
                ("bf16_gflops", "bf16 GFLOP/s"),
                ("fp16_gflops", "fp16 GFLOP/s"),
                ("int8_gops", "int8 GOP/s"),
            )
            if got.get(key)
        ]
        said.append(
            f"{device}: "
            + ", ".join(parts)
            + f", copy bandwidth {num(got.get('bandwidth_gbs'), 1)} GB/s"
            f" ({num(got.get('threads'))} thread(s), {num(got.get('seconds'), 1)} s to measure)"
        )
    blocks: list[Block] = [
        Heading(3, "How far from the limit"),
        Para(
            "This machine's practical peaks, measured after the timing (the best of a second "
            "of 2048-square matmuls per precision, and of a 512 MiB copy): "
            + "; ".join(said)
            + ". Each row's achieved GFLOP/s (the model's FLOPs times its images/s) is a share "
            "of the peak of its precision; its intensity counts the bytes every op of the fp32 "
            "graph moves, at the row's element width (an engine that fuses moves less: its "
            "real point lies further right). Below the bandwidth's slope a row is held by "
            "memory, under the flat roof by compute."
        ),
    ]
    ok = sorted(
        (r for r in rows if r.get("status") == "ok" and r.get("intensity_flop_per_byte")),
        key=lambda r: (r.get("batch") or 0, -(r.get("peak_pct") or 0)),
    )
    blocks.append(
        Table(
            ["variant", "batch", "precision", "GFLOP/s", "share of peak", "FLOPs per byte"],
            [
                [
                    str(r.get("variant")),
                    num(r.get("batch")),
                    str(r.get("precision")),
                    num(r.get("gflops_per_s"), 1),
                    f"{num(r.get('peak_pct'), 1)}%" if r.get("peak_pct") is not None else DASH,
                    num(r.get("intensity_flop_per_byte"), 1),
                ]
                for r in ok
            ],
            numeric={1, 3, 4, 5},
        )
    )
    chart = plots / "roofline.png"
    if chart.is_file():
        blocks.append(Image(chart, "roofline: achieved GFLOP/s against FLOPs per byte"))
    return blocks


def compression_section(bench: dict | None, records: list[dict], prof: dict | None) -> list[Block]:
    """What each compression did against its uncompressed twin (`oipipe.reporting.compression`):
    one table, one sentence each; nothing when no compression and its twin were both built."""
    if bench is None:
        return []
    rows = compression.table({r.get("variant", ""): r for r in records}, bench)
    if not rows:
        return []
    batches = sorted({b for r in rows for b in r["speed_ratio"]})
    ref = bench.get("reference_batch") or (batches[-1] if batches else 1)

    def pair(a: Any, b: Any, digits: int | None) -> str:
        return f"{num(b, digits)} → {num(a, digits)}"

    return [
        Heading(2, "What each compression did"),
        Para(
            "Each compression against the same engine uncompressed (its twin): FLOPs per image, "
            "bytes every op moves per image at batch 1 (counted op by op on one eager call at the "
            "precision's element width: an upper bound for an engine that fuses), parameters, "
            "artifact size, speed as the ratio of the two throughputs at each batch size, and "
            "top-1 with the accuracy verdict against fp32."
        ),
        Table(
            [
                "compression",
                "variant",
                "twin",
                "GFLOPs",
                "MB moved",
                "parameters",
                "size MB",
                *[f"speed b{b}" for b in batches],
                "top-1",
                "verdict",
            ],
            [
                [
                    str(r["compression"]),
                    str(r["variant"]),
                    str(r["twin"]),
                    pair(r["gflops"], r["twin_gflops"], None),
                    pair(r["mb_moved_b1"], r["twin_mb_moved_b1"], 1),
                    pair(r["params"], r["twin_params"], 0)
                    if r["params"] != r["twin_params"]
                    else "same",
                    pair(r["size_mb"], r["twin_size_mb"], 1),
                    *[
                        f"{num(r['speed_ratio'].get(b), 2)}x"
                        if r["speed_ratio"].get(b) is not None
                        else DASH
                        for b in batches
                    ],
                    compression.top1_text(r),
                    str(r["verdict"]),
                ]
                for r in rows
            ],
        ),
        Bullets([compression.sentence(r, ref, prof) for r in rows]),
    ]


def profile_section(cfg: DictConfig, prof: dict | None) -> list[Block]:
    """Where the time goes: the profile stage's paragraph, a table per mode and batch size."""
    file = path(cfg, "metrics") / "profile.json"
    blocks: list[Block] = [Heading(2, "Where the time goes")]
    if prof is None:
        return [*blocks, not_run(f"`{rel(cfg, file)}`", "profile")]
    blocks.append(
        Para(
            f"Self CPU time per operator type (`torch.profiler`) against FLOPs per "
            f"type, from `{rel(cfg, file)}`, {num(prof.get('threads'))} thread(s). "
            "GFLOP/s is the type's FLOPs over its time; FLOP/byte counts every "
            "tensor an op reads and writes, weights included, before any fusion. "
            + str(prof.get("paragraph", ""))
        )
    )
    for key, p in prof.get("profiles", {}).items():
        rows = [
            [
                kind,
                percent_text(v.get("time_share_pct")),
                percent_text(v.get("flop_share_pct")),
                num(v.get("time_ms"), 3),
                num(v.get("gflops_per_s"), 1),
                num(v.get("intensity"), 1),
            ]
            for kind, v in p.get("types", {}).items()
        ]
        blocks += [
            Heading(
                3,
                f"{p.get('mode', key)} at batch {p.get('batch', DASH)}: "
                f"{num(p.get('total_ms'), 2)} ms per call",
            ),
            Table(
                ["operator type", "time", "FLOPs", "ms per call", "GFLOP/s", "FLOP/byte"],
                rows,
                numeric={1, 2, 3, 4, 5},
            ),
        ]
    chart = path(cfg, "plots") / "profile.png"
    if chart.is_file():
        blocks.append(Image(chart, "time share against FLOP share per operator type"))
    return blocks


def fact(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v)) or "none"
    return num(v) if v is None or isinstance(v, bool) else str(v)


def machine_section(bench: dict | None) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading(2, "Machine")]
    if bench is not None and bench.get("machine"):
        facts = dict(bench["machine"])
        blocks.append(Para("The machine the benchmark ran on, as it recorded it:"))
    else:
        facts = machine_info()
        blocks.append(
            Para(
                "The benchmark has not run, so these facts describe the machine that "
                "wrote this report:"
            )
        )
    blocks.append(Table(["", "value"], [[k, fact(v)] for k, v in facts.items()]))
    return blocks, facts


# --- the stage ---------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Write REPORT.md and REPORT.html from the outputs of the stages that have run."""
    metrics, reports = path(cfg, "metrics"), path(cfg, "reports")
    train_file = metrics / "train.json"
    train = read_json(train_file, "train")
    if train is None:
        raise InputError(f"{train_file} not found: run the train stage first (`dvc repro train`)")
    bench = read_json(metrics / "benchmark.json", "benchmark")
    prof = read_json(metrics / "profile.json", "profile")
    records = read_optimize_records(cfg)

    data_blocks, data, counts = dataset_section(cfg)
    train_blocks, trained = training_section(cfg, train, counts.get("test"))
    opt_blocks, optimized = optimize_section(cfg, records)
    bench_blocks, benched = benchmark_section(cfg, bench)
    machine_blocks, machine = machine_section(bench)
    ship, other_batches, shipped = ship_blocks(cfg, bench, records)

    source = (
        "Open Images" if cfg.data.source == "openimages" else f"the photo folder {cfg.data.folder}"
    )
    title = f"{cfg.model.name} on {data['classes'] or len(cfg.data.classes)} classes of {source}"
    summary = [
        *other_batches,
        f"Trained model: test accuracy {trained['test']}; validation "
        f"{trained['val']} at the checkpoint"
        + (f" selected by `{trained['selected_by']}`." if trained["selected_by"] else "."),
    ]
    if optimized["variants"]:
        ok = sum(s == "ok" for s in optimized["variants"].values())
        verdicts = Counter(optimized["verdicts"].values())
        said = ", ".join(f"{verdicts[v]} {v}" for v in ("pass", "fail", "undecided") if verdicts[v])
        summary.append(
            f"{ok} of {len(optimized['variants'])} optimized variant(s) built"
            + (f"; accuracy verdicts: {said}." if said else ".")
        )
    version = project_version()
    blocks: list[Block] = [
        Heading(1, title),
        *ship,
        Bullets(summary),
        *data_blocks,
        *train_blocks,
        *opt_blocks,
        *bench_blocks,
        *compression_section(bench, records, prof),
        *profile_section(cfg, prof),
        *machine_blocks,
        Para(f"Written by oi-pipeline {version} (code commit {git_commit()})."),
    ]

    md_file, html_file = reports / "REPORT.md", reports / "REPORT.html"
    with stage_run(cfg, "report") as tracker:
        write_text(md_file, render_markdown(blocks, reports))
        write_text(html_file, render_html(blocks, title))
        for f in (md_file, html_file):
            tracker.log_artifact(f)
    log.info("wrote %s and %s", md_file, html_file)
    return {
        "report_md": str(md_file),
        "report_html": str(html_file),
        "title": title,
        "ship": shipped,
        "dataset": data,
        "training": trained,
        "optimize": optimized,
        "benchmark": benched if bench is not None else None,
        "machine": machine,
        "version": version,
    }


def main() -> None:
    cli.main("report", run)


if __name__ == "__main__":
    main()
