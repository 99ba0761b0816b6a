"""Stage `export`: deployable artifacts of the trained model (TorchScript, torch.export, ONNX),
each checked against it on real test images; an artifact outside `export.rtol` or below 100%
agreement fails the stage after `metrics/export.json` is written. Inputs, outputs, settings and
exit codes: docs/stages/export.md.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from omegaconf import DictConfig

from oipipe.core import cli, progress
from oipipe.core.config import path
from oipipe.core.errors import InputError, StageError
from oipipe.core.files import write_json
from oipipe.core.tracking import stage_run
from oipipe.core.variants import FORMATS, imported
from oipipe.data.datasets import PreparedImages, eval_transform
from oipipe.deploy.export_formats import META_FILE
from oipipe.deploy.runtime import load_artifact
from oipipe.training import models

log = logging.getLogger("stages.export")


class ExportCheckFailed(StageError):
    """An artifact does not reproduce the eager model."""


# --- the check: each artifact, loaded as every consumer loads it, against the eager model -----


def output_difference(eager: np.ndarray, got: np.ndarray) -> dict:
    diff = float(np.abs(eager - got).max())
    scale = float(np.abs(eager).max()) or 1.0
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "top1_agreement_pct": 100 * float((eager.argmax(1) == got.argmax(1)).mean()),
    }


def verification_batches(cfg: DictConfig, meta: dict, sizes: list[int]) -> dict[int, torch.Tensor]:
    """Real, preprocessed test images (never zeros), one batch per verification size."""
    ds = PreparedImages(
        path(cfg, "prepared"),
        "test",
        eval_transform(meta["input_size"], meta["mean"], meta["std"], meta["crop_pct"]),
    )
    if len(ds) == 0:
        raise InputError(f"{path(cfg, 'prepared')}/test.csv has no image to verify against")
    out = {}
    for b in sizes:  # wrap around a small test split rather than pad with anything synthetic
        out[b] = torch.stack([ds[i % len(ds)][0] for i in range(b)])
    return out


def run(cfg: DictConfig) -> dict:
    """Export the trained checkpoint to every configured format and verify each artifact."""
    ex = cfg.export
    model, meta = models.load_trained(path(cfg, "checkpoint"))
    meta_json = json.dumps(meta, sort_keys=True)
    batches = verification_batches(cfg, meta, list(ex.verify_batch_sizes))
    with torch.no_grad():
        eager = {b: model(x).numpy() for b, x in batches.items()}
    # batch 2: a batch of 1 would be specialised to 1. clone(): torch.export saves the example
    # with the program, and a view would drag its whole batch's storage into the file
    example = batches[max(batches)][:2].clone()
    out_dir = path(cfg, "exported")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, float | int | bool] = {}
    failures = []
    with stage_run(cfg, "export") as tracker:
        tracker.log_params(
            {
                "export.formats": list(ex.formats),
                "export.onnx_opset": ex.onnx_opset,
                "export.rtol": ex.rtol,
            }
        )
        # per format: the export (one call, seconds to a minute), then a check per batch size
        with progress.steps(len(ex.formats) * (1 + len(batches)), "export") as bar:
            for fmt in ex.formats:
                dst = out_dir / FORMATS[fmt].file
                bar.set_description(f"export {fmt}")
                t0 = time.perf_counter()
                imported(FORMATS[fmt].writer)(model, example, dst, meta_json, ex)
                report[f"{fmt}.export_seconds"] = round(time.perf_counter() - t0, 2)
                report[f"{fmt}.size_mb"] = round(dst.stat().st_size / 2**20, 3)
                bar.update(1)
                runner, loaded_meta = load_artifact(dst)  # as every consumer loads it
                ok = loaded_meta == meta
                if not ok:
                    failures.append(f"{fmt}: metadata did not survive the round trip")
                for b, x in batches.items():
                    bar.set_description(f"verify {fmt} b{b}")
                    res = output_difference(eager[b], runner(x))
                    bar.update(1)
                    report.update({f"{fmt}.batch{b}.{k}": v for k, v in res.items()})
                    if res["max_rel_diff"] > ex.rtol or res["top1_agreement_pct"] < 100.0:
                        ok = False
                        failures.append(
                            f"{fmt} at batch {b}: relative logit difference "
                            f"{res['max_rel_diff']:.2e} (allowed {ex.rtol:.0e}), top-1 "
                            f"agreement {res['top1_agreement_pct']:.1f}%"
                        )
                report[f"{fmt}.ok"] = ok
                log.info(
                    "%s: %s, %.1f MB, %s",
                    fmt,
                    dst.name,
                    report[f"{fmt}.size_mb"],
                    "verified" if ok else "FAILED verification",
                )
        write_json(out_dir / META_FILE, meta)
        write_json(path(cfg, "metrics") / "export.json", report)
        tracker.log_metrics(report)
        tracker.log_artifact(path(cfg, "metrics") / "export.json")
    if failures:
        raise ExportCheckFailed("; ".join(failures))
    return report


def main() -> None:
    cli.main("export", run)


if __name__ == "__main__":
    main()
