"""Quantization-aware training (`openvino_qat_int8`): it trains with fake quantization, zero
epochs is the post-training model, a resumed run ends as an uninterrupted one, and the built IR
runs int8 and is judged like every variant.

NNCF's torch extension and OpenVINO run in fresh processes (as DVC runs every stage): with
OpenVINO's TBB threads loaded in the pytest process, later tests died in finalizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_export, on_trained, run_stage, write_params

from oipipe.core.config import compose, path

SETUP = """
import copy, json, sys, numpy as np, torch
from oipipe.core.config import load_params, path
from oipipe.core.variants import VARIANTS
from oipipe.deploy import build_qat
from oipipe.deploy.build import BuildContext
from oipipe.measure import evaluation
from oipipe.training import models
from pathlib import Path
cfg = load_params(Path(sys.argv[1]))
model, meta = models.load_trained(path(cfg, "checkpoint"))
images, labels = evaluation.images(path(cfg, "prepared"), ["test"], meta)
calibration = evaluation.calibration_batches(path(cfg, "prepared"), meta, 16, 8)
ctx = BuildContext(cfg, "openvino_qat_int8", VARIANTS["openvino_qat_int8"], model, meta,
                   images[:2].clone(), calibration, path(cfg, "exported"))
def logits(m):
    with torch.no_grad():
        return m(images).numpy()
out = {}
"""


def base(root: Path, prepared: Path, trained: Path, *overrides: str) -> list[str]:
    return on_trained(
        root,
        prepared,
        trained,
        "optimize.calibration_images=16",
        "optimize.calibration_batch=8",
        "optimize.settings.openvino_qat_int8.batch=8",
        "optimize.settings.openvino_qat_int8.lr=1e-3",  # tiny model, few steps: moves visibly
        *overrides,
    )


def fresh(cfg, tmp: Path, body: str) -> dict:
    params = write_params(cfg, tmp / "params.yaml")
    res = subprocess.run(
        [sys.executable, "-c", SETUP + body + "\nprint(json.dumps(out))", str(params)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_qat_trains_through_fake_quantization_and_zero_epochs_is_post_training(
    prepared, trained, tmp_path
) -> None:
    cfg = compose(base(tmp_path, prepared, trained, "optimize.settings.openvino_qat_int8.epochs=0"))
    got = fresh(
        cfg,
        tmp_path,
        """
q = build_qat.quantize(ctx)
names = {type(m).__name__ for m in q.modules()}
out["quantizers"] = sorted(n for n in names if "Quantizer" in n)
start = copy.deepcopy(q)
facts = build_qat.fit(ctx, q)
out["zero"] = float(np.abs(logits(q) - logits(start)).max())
out["epochs"] = facts["qat_epochs_run"]
# one epoch at a visible learning rate: the fake-quantized weights and ranges move, gradients
# flow through the quantizers (their scales are parameters too)
from omegaconf import OmegaConf
c2 = OmegaConf.create(OmegaConf.to_container(cfg))
c2.optimize.settings.openvino_qat_int8.epochs = 1
ctx.cfg = c2
facts = build_qat.fit(ctx, q)
out["moved"] = float(np.abs(logits(q) - logits(start)).max())
out["scales_grad"] = any(
    p.grad is not None and float(p.grad.abs().sum()) > 0
    for n, p in q.named_parameters() if "scale" in n
)
out["losses"] = facts["qat_val_losses"]
""",
    )
    assert got["quantizers"], "no NNCF quantizer in the model being fine-tuned"
    assert got["zero"] == 0.0 and got["epochs"] == 0  # zero epochs: the post-training model
    assert len(got["losses"]) == 2  # epoch 0 (post-training) and epoch 1
    # kept only when its validation loss is lower; either way the record says which
    assert got["scales_grad"]
    if got["losses"][1] < got["losses"][0]:
        assert got["moved"] > 0


@pytest.mark.slow
def test_a_resumed_qat_run_ends_as_an_uninterrupted_one(prepared, trained, tmp_path) -> None:
    cfg = compose(base(tmp_path, prepared, trained, "optimize.settings.openvino_qat_int8.epochs=2"))
    got = fresh(
        cfg,
        tmp_path,
        """
import shutil
q = build_qat.quantize(ctx)
whole = build_qat.fit(ctx, q)
out["whole"] = logits(q).tolist()
shutil.rmtree(build_qat.work_folder(ctx))
q = build_qat.quantize(ctx)
out["cut"] = build_qat.fit(ctx, q, stop_after=1)  # killed after epoch 1
q = build_qat.quantize(ctx)  # a new run: the post-training start again, then the work folder
resumed = build_qat.fit(ctx, q)
out["resumed"] = logits(q).tolist()
out["facts"] = [whole, resumed]
""",
    )
    assert got["cut"] == {"qat_epochs_run": 1, "interrupted": True}
    whole, resumed = got["facts"]
    assert whole["qat_epochs_run"] == resumed["qat_epochs_run"] == 2
    assert whole["qat_val_losses"] == resumed["qat_val_losses"]
    assert whole["qat_best_epoch"] == resumed["qat_best_epoch"]
    assert got["whole"] == got["resumed"]


@pytest.mark.slow
def test_the_qat_variant_builds_runs_int8_and_is_judged(
    exported_onnx, prepared, trained, tmp_path
) -> None:
    cfg = compose(base(tmp_path, prepared, trained, "optimize.settings.openvino_qat_int8.epochs=1"))
    copy_export(exported_onnx, cfg)
    params = write_params(cfg, tmp_path / "params.yaml")
    res = run_stage("optimize", params, "--variant", "openvino_qat_int8")
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((path(cfg, "optimized") / "openvino_qat_int8" / "record.json").read_text())
    assert rec["status"] == "ok", rec["error"]
    assert rec["backend"] == "openvino" and rec["precision"] == "int8"
    assert rec["int8_layers"] > 10 and rec["calibration_images"] == 16
    assert rec["qat_epochs_run"] == 1 and rec["qat_best_epoch"] in (0, 1)
    assert rec["verdict"] in ("pass", "undecided", "fail")
    n = rec["vs_post_training_images"]
    assert n == rec["eval_images"]
    assert rec["vs_post_training_ci_low_pct"] <= rec["vs_post_training_delta_pct"]
    assert rec["vs_post_training_delta_pct"] <= rec["vs_post_training_ci_high_pct"]
    assert rec["vs_post_training_delta_pct"] == pytest.approx(
        100 * (rec["vs_post_training_better"] - rec["vs_post_training_worse"]) / n, abs=1e-3
    )
    assert not Path(rec["qat_work"]).exists()  # built: the epochs' work folder is gone
