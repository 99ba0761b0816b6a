"""Entry point `compare`: one comparison across the MLflow runs of a sweep, or of an experiment
(usage and what it writes: README, "Comparing runs", and `--help`).

Not a DVC stage (it reads MLflow, which DVC does not track) but a peer of the stages
(CONVENTIONS 11): it imports no stage module, only the libraries `document` (blocks and their
renderers) and `pareto` (the rule that picks what to ship, the frontier and its chart), and never
torch.

What it reads from the store (`--tracking-uri` wins over the configured one):

- parent runs, one per job: the pipeline runs (no `mlflow.parentRunId` tag) tagged
  `sweep_name=<--sweep>`, or every top-level run of the experiment, narrowed by `--filter`. From
  each: tags `sweep_job` and `sweep_overrides` (else the run name), param (or tag) `model.name`,
  metrics `train.test_acc_pct` with its `_ci_low_pct`/`_ci_high_pct` and `train.test_images`, tags
  `machine.*` (set by the benchmark);
- child runs, one per variant and batch size as the benchmark logs them: params `variant`,
  `backend`, `precision`, `batch_size`; metrics `throughput`, `latency_p99_ms`, `speedup`,
  `top1_pct` with its interval, `eval_images`, `size_mb`; tags `status`, `verdict`, `error`.

Every accuracy is read in the unit its name carries (`_pct`). Runs logged before the names
carried a unit (`top1`, `train.test_acc`, ...: `LEGACY_KEYS`) are read as they were logged, never
rescaled by a guess, and COMPARE.md names them.

It writes under `paths.compare`, not under the report stage's DVC output `paths.reports`, which
`dvc repro` empties before it runs. What to ship is the benchmark's rule applied across jobs: the
fastest (job, variant) whose accuracy verdict is not `fail`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from omegaconf import DictConfig

from oipipe.core import cli
from oipipe.core.config import path
from oipipe.core.errors import InputError
from oipipe.core.files import write_text
from oipipe.core.tracking import tracking_uri
from oipipe.measure.pareto import TIE_MARGIN_PCT, fastest_shippable, mark_frontier, pareto_chart
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

log = logging.getLogger("oitools.compare")

BASELINE = "eager_fp32"  # the baseline of runs logged before each row named its own
PAGE = 1000  # runs per search request (MLflow's SQL stores serve at most 50000)
MACHINE_TAGS = ("machine.cpu", "machine.gpu")  # what makes two jobs' throughputs comparable


# The names these metrics had before every accuracy's name carried its unit. A run that has only
# the old name is read as it was logged (benchmark rows were percent; train.test_acc was a fraction
# in the oldest runs, percent later) and listed in COMPARE.md, not rescaled by a guess.
LEGACY_KEYS = {
    "top1_pct": "top1",
    "top1_ci_low_pct": "top1_ci_low",
    "top1_ci_high_pct": "top1_ci_high",
    "train.test_acc_pct": "train.test_acc",
    "train.test_acc_ci_low_pct": "train.test_acc_ci_low",
    "train.test_acc_ci_high_pct": "train.test_acc_ci_high",
}


def metric(metrics: dict, key: str, legacy: set[str]) -> float | None:
    """`metrics[key]`, else its legacy name's value as logged (and the name added to `legacy`)."""
    if key in metrics:
        return float(metrics[key])
    old = LEGACY_KEYS.get(key)
    if old is not None and old in metrics:
        legacy.add(old)
        return float(metrics[old])
    return None


@dataclass
class Job:
    """One parent run: a pipeline execution with its trained model and its benchmark rows."""

    run_id: str
    name: str  # sweep_job, else the run name, else the run id
    overrides: str  # sweep_overrides, else the run name
    model: str
    test_acc: tuple[Any, Any, Any]  # (percent, low, high), each None where not logged
    test_images: int | None
    machine: tuple
    rows: list[dict] = field(default_factory=list)
    legacy_keys: set[str] = field(default_factory=set)  # old metric names it was read by

    @property
    def test_text(self) -> str:
        return accuracy_text(*self.test_acc, self.test_images)


# --- reading the store ---------------------------------------------------------------------------


def search(client, experiment_id: str, filter_string: str) -> list:
    """Every run matching `filter_string`, oldest first, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=filter_string,
            max_results=PAGE,
            page_token=token,
            order_by=["attribute.start_time ASC"],
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def quoted(value: str) -> str:
    """A string literal for an MLflow filter (it takes single or double quotes, no escapes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise InputError(f"{value!r} holds both quote characters: MLflow's filter cannot match it")


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def child_row(run, legacy: set[str]) -> dict:
    """A child run as the benchmark row it was logged from."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    return {
        "run_id": run.info.run_id,
        "variant": p.get("variant", run.info.run_name),
        "backend": p.get("backend"),
        "precision": p.get("precision"),
        "batch": _int(p.get("batch_size")),
        "status": t.get("status", "unknown"),
        "verdict": t.get("verdict"),
        "error": t.get("error"),
        "throughput": m.get("throughput"),
        "throughput_min": m.get("throughput_min"),  # absent in runs logged before the tie rule
        "throughput_max": m.get("throughput_max"),
        "latency_p99_ms": m.get("latency_p99_ms"),
        "speedup": m.get("speedup"),
        "baseline": t.get("baseline", BASELINE),  # what the speed-up divides by
        "size_mb": m.get("size_mb"),
        "eval_images": _int(m.get("eval_images")),
        **{k: metric(m, k, legacy) for k in ("top1_pct", "top1_ci_low_pct", "top1_ci_high_pct")},
    }


def job_of(run, client, experiment_id: str) -> Job:
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    name = t.get("sweep_job") or run.info.run_name or run.info.run_id[:8]
    children = search(client, experiment_id, f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    legacy: set[str] = set()
    job = Job(
        run_id=run.info.run_id,
        name=str(name),
        overrides=t.get("sweep_overrides") or run.info.run_name or DASH,
        model=p.get("model.name") or t.get("model.name") or DASH,
        test_acc=(
            metric(m, "train.test_acc_pct", legacy),
            metric(m, "train.test_acc_ci_low_pct", legacy),
            metric(m, "train.test_acc_ci_high_pct", legacy),
        ),
        test_images=_int(m.get("train.test_images")),
        machine=tuple(t.get(k) for k in MACHINE_TAGS),
        legacy_keys=legacy,
    )
    job.rows = [{**child_row(c, legacy), "job": job.name} for c in children]
    return job


def read_jobs(uri: str, experiment: str, sweep: str | None, filter_string: str | None) -> list[Job]:
    """The jobs selected, in sweep order (`sweep_job` when numeric), each with its rows."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        # MLflow would create an empty store at a mistyped path and report "no runs". SQLAlchemy's
        # form: sqlite:///relative.db, sqlite:////absolute.db
        db = Path(unquote(uri[len("sqlite:///") :].split("?")[0]))
        if not db.is_file():
            raise InputError(
                f"no MLflow store at {db} ({uri}): run the pipeline first, or pass "
                "--tracking-uri (or set MLFLOW_TRACKING_URI) to the store to read"
            )
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise InputError(
                f"no MLflow experiment {experiment!r} at {uri} (experiments there: "
                f"{names}); pass --experiment or tracking.experiment=<name>"
            )
        clauses = [f"tags.sweep_name = {quoted(sweep)}"] if sweep else []
        clauses += [filter_string] if filter_string else []  # MLflow's filters: AND, no ()
        try:
            found = search(client, exp.experiment_id, " and ".join(clauses))
        except MlflowException as e:
            raise InputError(f"the MLflow filter {filter_string!r} is invalid: {e.message}") from e
        parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        if not parents:
            sweeps = sorted(
                {
                    r.data.tags["sweep_name"]
                    for r in search(client, exp.experiment_id, "")
                    if "sweep_name" in r.data.tags
                }
            )
            what = (f"sweep {sweep!r}" if sweep else "the experiment") + (
                f" matching {filter_string!r}" if filter_string else ""
            )
            raise InputError(
                f"no runs of {what} in experiment {experiment!r} at {uri}; "
                f"sweeps there: {sweeps or 'none'}"
            )
        jobs = [job_of(r, client, exp.experiment_id) for r in parents]
    except MlflowException as e:
        raise InputError(f"cannot read MLflow at {uri}: {e.message}") from e
    if all(j.name.isdigit() for j in jobs):
        jobs.sort(key=lambda j: int(j.name))
    return jobs


# --- the document ---------------------------------------------------------------------------------


def label(row: dict) -> str:
    return f"{row['job']}/{row['variant']}"


def measured(row: dict) -> bool:
    """A row with a speed and an accuracy: a point of the Pareto chart."""
    return row["status"] == "ok" and row.get("top1_pct") is not None and bool(row.get("throughput"))


def ship_text(w: dict | None, batch: int, jobs: dict[str, Job], lead: bool = True) -> str:
    """The first line (`lead`) or one of the lines for the other batch sizes."""
    if w is None:
        return (
            f"**Nothing to ship at batch {batch}**: " if lead else f"At batch {batch}: "
        ) + "no (job, variant) finished there with an accuracy verdict other than `fail`."
    job = jobs[w["job"]]
    undecided = " (accuracy undecided)" if w.get("verdict") == "undecided" else ""
    sp = w.get("speedup")
    speed = (
        f", {sp:.2f}× the throughput of its own job's `{w['baseline']}` at batch {batch}"
        if sp is not None and w["variant"] != w["baseline"]
        else ""
    )
    acc = accuracy_text(
        w.get("top1_pct"), w.get("top1_ci_low_pct"), w.get("top1_ci_high_pct"), w.get("eval_images")
    )
    what = f"`{w['variant']}` of job `{job.name}`{undecided}"
    tie = (
        "; its speed ties with "
        + ", ".join(f"`{r['variant']}` of job `{jobs[r['job']].name}`" for r in w["tied"])
        + f" (their trials overlap, or are within {TIE_MARGIN_PCT:g}%), so it is chosen for "
        "its verdict, then its top-1, then its size"
        if w.get("tied")
        else ""
    )
    return (f"**Ship {what} at batch {batch}**: " if lead else f"At batch {batch}: {what}, ") + (
        f"{num(w.get('throughput'), 1)} images/s, p99 latency "
        f"{num(w.get('latency_p99_ms'), 2)} ms, top-1 {acc}{speed}{tie}; produced by the "
        f"overrides `{job.overrides}` (model `{job.model}`, "
        f"trained to test accuracy {job.test_text})."
    )


def batch_table(rows: list[dict], jobs: dict[str, Job], frontier: set[str] | None) -> Table:
    cells, kinds = [], []
    for r in rows:
        job = jobs[r["job"]]
        status = r["status"]
        sp = r.get("speedup")
        cells.append(
            [
                job.name,
                job.overrides,
                job.model,
                job.test_text,
                str(r["variant"]),
                f"{r.get('backend') or DASH} {r.get('precision') or ''}".strip(),
                status,
                accuracy_text(
                    r.get("top1_pct"),
                    r.get("top1_ci_low_pct"),
                    r.get("top1_ci_high_pct"),
                    r.get("eval_images"),
                ),
                str(r.get("verdict") or DASH),
                num(r.get("throughput"), 1),
                num(r.get("latency_p99_ms"), 2),
                f"{sp:.2f}×" if sp is not None else DASH,
                num(r.get("size_mb"), 1),
                DASH
                if frontier is None or not measured(r)
                else ("yes" if label(r) in frontier else "no"),
            ]
        )
        kinds.append(status if status != "ok" else f"verdict-{r.get('verdict')}")
    return Table(
        [
            "job",
            "overrides",
            "model",
            "test accuracy (trained)",
            "variant",
            "back end, precision",
            "status",
            "top-1 (variant)",
            "verdict",
            "throughput (img/s)",
            "p99 (ms)",
            "speed-up",
            "size (MB)",
            "Pareto",
        ],
        cells,
        numeric={9, 10, 11, 12},
        row_class=kinds,
    )


def run(
    cfg: DictConfig,
    sweep: str | None = None,
    filter_string: str | None = None,
    uri: str | None = None,
    out: Path | None = None,
    batch: int | None = None,
    experiment: str | None = None,
) -> dict:
    """Write COMPARE.md, COMPARE.html and compare_pareto.png for the selected runs."""
    uri = uri or tracking_uri(cfg)
    experiment = experiment or str(cfg.tracking.experiment)
    out = out if out is not None else path(cfg, "compare")
    jobs = read_jobs(uri, experiment, sweep, filter_string)
    by_name = {j.name: j for j in jobs}
    if len(by_name) != len(jobs):  # two parents claim one sweep_job: keep them apart
        for j in jobs:
            j.name = f"{j.name}@{j.run_id[:8]}"
            j.rows = [{**r, "job": j.name} for r in j.rows]
        by_name = {j.name: j for j in jobs}
    rows = [r for j in jobs for r in j.rows]
    sizes = sorted({r["batch"] for r in rows if r["batch"] is not None})
    if batch is not None and batch not in sizes:
        raise InputError(
            f"--batch {batch} was not measured by the runs selected; measured: {sizes or 'none'}"
        )
    ref = batch if batch is not None else (max(sizes) if sizes else None)

    selection = (f"sweep `{sweep}`" if sweep else f"experiment `{experiment}`") + (
        f" filtered by `{filter_string}`" if filter_string else ""
    )
    title = f"Comparison of {len(jobs)} job(s) of " + (
        f"sweep {sweep}" if sweep else f"experiment {experiment}"
    )
    blocks: list[Block] = [Heading(1, title)]
    points: list[dict] = []
    shipped = None
    if ref is None:
        blocks.append(
            Para(
                "**Nothing to ship**: no job of " + selection + " has benchmark rows "
                "(run the benchmark stage in each job)."
            )
        )
    else:
        at_ref = [r for r in rows if r["batch"] == ref]
        shipped = fastest_shippable(at_ref)
        others = [
            ship_text(
                fastest_shippable([r for r in rows if r["batch"] == b]), b, by_name, lead=False
            )
            for b in sizes
            if b != ref
        ]
        points = mark_frontier([{**r, "label": label(r)} for r in at_ref if measured(r)])
        blocks += [Para(ship_text(shipped, ref, by_name)), *([Bullets(others)] if others else [])]

    machines = {j.machine for j in jobs if any(j.machine)}
    machine_list = "; ".join(", ".join(str(x) for x in m if x) for m in sorted(machines, key=str))
    blocks.append(
        Para(
            f"The runs of {selection} in the MLflow store `{uri}`: one parent run per job, its "
            "benchmark rows as nested runs. The choice is the fastest (job, variant) whose "
            "accuracy verdict is not `fail` (`undecided` is kept and labelled), unless one "
            "whose speed ties with it (overlapping trials, or within "
            f"{TIE_MARGIN_PCT:g}%) has a better verdict, then top-1, then a smaller file. "
            "Accuracies are percentages with their 95% Wilson interval and number of "
            "images: the trained model's on its test split, the variant's on the "
            "benchmark's evaluation images. Speed-ups divide by each job's own baseline (the "
            "faster eager layout) at the same batch size, so they "
            "compare variants within a job; throughput compares across jobs."
            + (
                f" **The jobs ran on {len(machines)} different machines** ({machine_list}): "
                "their throughputs do not compare."
                if len(machines) > 1
                else ""
            )
        )
    )
    old = [j for j in jobs if j.legacy_keys]
    if old:
        blocks.append(
            Para(
                f"{len(old)} job(s) were logged before metric names carried their unit and are "
                "read by the old names, as logged, not rescaled: "
                + "; ".join(
                    f"{j.name} ({', '.join(f'`{k}`' for k in sorted(j.legacy_keys))})" for j in old
                )
                + ". A `train.test_acc` below 1 there is a fraction of the test images."
            )
        )

    blocks.append(Heading(2, "Jobs"))
    blocks.append(
        Table(
            [
                "job",
                "overrides",
                "model",
                "test accuracy (trained)",
                "benchmark rows",
                "MLflow run",
            ],
            [[j.name, j.overrides, j.model, j.test_text, str(len(j.rows)), j.run_id] for j in jobs],
            numeric={4},
        )
    )
    chart = out / "compare_pareto.png"
    if ref is not None:
        pareto_chart(points, ref, BASELINE, chart, label="label")
        front = [p["label"] for p in points if p["on_frontier"]]
        blocks += [
            Heading(2, f"Speed against accuracy at batch {ref}"),
            Para(
                "On the Pareto frontier (no other (job, variant) is at least as fast and "
                "as accurate, and better in one): "
                + (", ".join(f"`{f}`" for f in front) or "none")
                + "."
            ),
            Image(
                chart,
                f"top-1 (95% intervals) against throughput at batch {ref}, every "
                "job and variant, the Pareto frontier drawn",
            ),
        ]
    frontier = {p["label"] for p in points if p["on_frontier"]}
    for b in ([ref] if ref is not None else []) + [s for s in sizes if s != ref]:
        in_batch = [r for r in rows if r["batch"] == b]
        blocks += [
            Heading(2, f"Batch {b}" + (" (reference)" if b == ref else "")),
            batch_table(in_batch, by_name, frontier if b == ref else None),
        ]

    md_file, html_file = out / "COMPARE.md", out / "COMPARE.html"
    write_text(md_file, render_markdown(blocks, out))
    write_text(html_file, render_html(blocks, title))
    log.info("wrote %s and %s (%d jobs, %d rows)", md_file, html_file, len(jobs), len(rows))
    return {
        "compare_md": str(md_file),
        "compare_html": str(html_file),
        "chart": str(chart) if ref is not None else None,
        "reference_batch": ref,
        "ship": shipped,
        "jobs": [j.name for j in jobs],
        "rows": rows,
        "pareto": points,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Its own options, then the shared entry point (params, overrides, exit codes)."""
    parser = cli.stage_parser(
        "compare",
        "One comparison across the MLflow runs of a sweep, or "
        "of an experiment: COMPARE.md/html and the Pareto chart under "
        "paths.compare.",
        module="oitools.compare",
    )
    parser.add_argument("--sweep", help="compare the parent runs tagged sweep_name=SWEEP")
    parser.add_argument(
        "--filter",
        dest="filter_string",
        help="an MLflow search filter on the parent runs, e.g. \"tags.x = 'y'\"",
    )
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the configured one)")
    parser.add_argument("--experiment", help="default: tracking.experiment")
    parser.add_argument("--out", type=Path, help="folder for COMPARE.md/html (paths.compare)")
    parser.add_argument("--batch", type=int, help="reference batch (default: the largest)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return cli.run_stage(
        "compare",
        lambda cfg: run(
            cfg,
            sweep=args.sweep,
            filter_string=args.filter_string,
            uri=args.tracking_uri,
            out=args.out,
            batch=args.batch,
            experiment=args.experiment,
        ),
        args=args,
    )


if __name__ == "__main__":
    sys.exit(main())
