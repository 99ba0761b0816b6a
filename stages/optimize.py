"""Stage `optimize`: one optimized variant of the trained model per entry of `optimize.variants`.

DVC runs one instance per variant (`optimize@inductor_int8`, ...), so a failing variant never
erases the others. What a variant is (backend, precision, file, requirements, build and load
functions) is its row in `oipipe.core.variants.VARIANTS`; the builders are one module per backend
in oipipe/deploy/, each variant's settings its block in conf/optimize. Every variant is loaded
back from disk (`oipipe.deploy.runtime.load_file`) before it is evaluated against fp32
(`oipipe.measure.evaluation`). Outputs, statuses and exit codes: docs/stages/optimize.md.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import InputError, error_text
from oipipe.core.files import atomic_dir, write_json
from oipipe.core.tracking import stage_run, verdict_code
from oipipe.core.variants import FORMATS, VARIANTS
from oipipe.data.datasets import PreparedImages
from oipipe.deploy import build
from oipipe.deploy.build import BuildContext
from oipipe.deploy.runtime import META, RECORD, load_file, variant_row
from oipipe.measure import evaluation
from oipipe.training import models

log = logging.getLogger("stages.optimize")

# record keys that are no MLflow metrics: texts, and a pruned model's per-layer channel counts
NOT_METRICS = ("error", "reason", "channels_before", "channels_after")


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: DictConfig, variant_name: str) -> dict:
    """Build one variant, load it back, measure its accuracy against fp32 on the held-out images
    (`optimize.eval_splits`, by default val + test), record it with its verdict."""
    name, variant = variant_name, variant_row(variant_name)
    folder = path(cfg, "optimized") / name
    metrics_file = path(cfg, "metrics") / "optimize" / f"{name}.json"
    record: dict[str, Any] = {
        "variant": name,
        "backend": variant.backend,
        "precision": variant.precision,
        "status": "skipped",
        "reason": None,
        "error": None,
        "artifact": None,
        "size_mb": None,
        "build_seconds": None,
    }
    # Inputs are checked before any work: these are the user's errors, not the variant's.
    model, meta = models.load_trained(path(cfg, "checkpoint"))
    exported = path(cfg, "exported")
    onnx_file = exported / FORMATS["onnx"].file
    if not onnx_file.is_file() and variant.backend in ("onnxruntime", "openvino"):
        raise InputError(
            f"{onnx_file} not found: run the export stage with 'onnx' in export.formats"
        )
    prepared, splits = path(cfg, "prepared"), list(cfg.optimize.eval_splits)
    images, labels = evaluation.images(prepared, splits, meta)
    batches = evaluation.batches(images, cfg.optimize.eval_batch)
    calibration: Callable[[], Iterator[torch.Tensor]] = lambda: iter(())  # noqa: E731
    if variant.precision == "int8":
        calibration = _counted_calibration(cfg, prepared, meta, name)

    with stage_run(cfg, "optimize") as tracker, atomic_dir(folder) as tmp:
        tracker.log_params(
            {
                f"optimize.{name}.backend": variant.backend,
                f"optimize.{name}.precision": variant.precision,
            }
        )
        reason = build.missing(variant.requires, cfg.optimize.allow_emulated)
        if reason:
            record["reason"] = reason
            log.warning("%s skipped: %s", name, reason)
        else:
            # batch 2 (1 would be specialised); cloned, or the saved program keeps the whole
            # batch the view points into (18 MB at 30 images of 224 px)
            first = batches[0] if len(batches[0]) > 1 else torch.cat([batches[0]] * 2)
            ctx = BuildContext(
                cfg, name, variant, model, meta, first[:2].clone(), calibration, exported
            )
            record.update(_build_and_check(cfg, ctx, tmp, batches, labels))
            record.update(ctx.notes)
        write_json(tmp / META, meta)
        write_json(tmp / RECORD, record)
        write_json(metrics_file, record)
        tracker.log_metrics(
            {
                name: {
                    **{k: v for k, v in record.items() if k not in NOT_METRICS},
                    "verdict_code": verdict_code(record.get("verdict")),
                }
            }
        )
        tracker.set_tags(
            {
                f"optimize.{name}.status": record["status"],
                **(
                    {f"optimize.{name}.verdict": record["verdict"]} if record.get("verdict") else {}
                ),
            }
        )
    return record


def _counted_calibration(
    cfg: DictConfig, prepared: Path, meta: dict, name: str
) -> Callable[[], Iterator[torch.Tensor]]:
    """The calibration batches, counted on a bar as the quantizer pulls them."""
    opt = cfg.optimize
    batches = evaluation.calibration_batches(
        prepared, meta, opt.calibration_images, opt.calibration_batch
    )
    images = min(opt.calibration_images, len(PreparedImages(prepared, "train")))
    total = -(-images // opt.calibration_batch)
    return lambda: progress.counted(batches(), total, f"{name} calibration")


def artifact_bytes(artifact: Path) -> int:
    """The artifact's size on disk; an OpenVINO IR's weights are in the .bin beside its .xml."""
    weights = artifact.with_suffix(".bin")
    extra = weights.stat().st_size if artifact.suffix == ".xml" and weights.is_file() else 0
    return artifact.stat().st_size + extra


def _build_and_check(
    cfg: DictConfig, ctx: BuildContext, tmp: Path, batches: list[torch.Tensor], labels: np.ndarray
) -> dict:
    name, variant = ctx.name, ctx.variant
    artifact = tmp / variant.file
    # relative to paths.root: records are DVC metrics and must not depend on the checkout path
    final = Path(cfg.paths.optimized) / name / variant.file
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        build.build(ctx, artifact)
        out["build_seconds"] = round(time.perf_counter() - t0, 3)
        out["artifact"] = str(final)
        out["size_mb"] = round(artifact_bytes(artifact) / 2**20, 3)
        runtime = load_file(variant, artifact)  # from disk, as the benchmark will
        outs = []
        with progress.steps(len(batches), f"{name} evaluation", "batch") as bar:
            for x in batches:
                outs.append(runtime(x))
                bar.update(1)
        got = np.concatenate(outs)
    except Exception as e:  # noqa: BLE001 - any build error is this variant's recorded result
        log.error("%s failed:\n%s", name, traceback.format_exc())
        for leftover in tmp.iterdir():  # no half-built artifact beside a `failed` record
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return {"status": "failed", "error": error_text(e), "artifact": None, "size_mb": None}
    fp32 = np.concatenate(evaluation.logits(ctx.model, batches))
    bar_pct = cfg.optimize.accuracy_bars_pct[variant.precision]
    acc = evaluation.against_fp32(fp32, got, labels, bar_pct)
    log.info(
        "%s: %.1f MB, built in %.1f s, top-1 %.1f%% [%.1f, %.1f] (fp32 %.1f%%) on %d "
        "images of %s, agreement %.1f%%: %s, %s",
        name,
        out["size_mb"],
        out["build_seconds"],
        acc["top1_pct"],
        acc["top1_ci_low_pct"],
        acc["top1_ci_high_pct"],
        acc["fp32_top1_pct"],
        acc["eval_images"],
        "+".join(cfg.optimize.eval_splits),
        acc["agreement_pct"],
        acc["verdict"].upper(),
        acc["verdict_reason"],
    )
    return {"status": "ok", **out, "eval_splits": list(cfg.optimize.eval_splits), **acc}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(
        "optimize",
        "Build one optimized variant of the trained model, "
        "load it back and measure its accuracy against fp32 (DVC runs one "
        "per entry of optimize.variants).",
    )
    # No argparse `choices`: run() names an unknown variant with "did you mean", exit code 2.
    parser.add_argument(
        "--variant",
        required=True,
        metavar="VARIANT",
        help="the variant to build, one of: "
        + ", ".join(f"{n} ({v.backend} {v.precision})" for n, v in VARIANTS.items()),
    )
    args = parser.parse_intermixed_args(argv)
    sys.exit(cli.run_stage("optimize", lambda cfg: run(cfg, args.variant), args=args))


if __name__ == "__main__":
    main()
