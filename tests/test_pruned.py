"""Channel pruning (`openvino_pruned_fp32`, `openvino_pruned_int8`): channels really go (parameter
count, every pruned convolution's width, depthwise groups kept consistent), the fine-tuned model
is made once and shared by the pruned variants, and the built IR loads with `load_artifact` and
gives the pruned model's logits.

NNCF, torch-pruning and OpenVINO run in fresh processes, as in tests/test_qat.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_export, on_trained, run_stage, write_params

from oipipe.core.config import compose, path

RATIO = 0.5


def config(root: Path, prepared: Path, trained: Path, *overrides: str):
    return compose(
        on_trained(
            root,
            prepared,
            trained,
            "optimize.calibration_images=16",
            "optimize.calibration_batch=8",
            f"optimize.settings.pruned.ratio={RATIO}",
            "optimize.settings.pruned.epochs=1",
            "optimize.settings.pruned.batch=8",
            *overrides,
        )
    )


CHECK = """
import json, sys, numpy as np, torch
from pathlib import Path
from oipipe.core.config import load_params, path
from oipipe.core.variants import VARIANTS
from oipipe.deploy import build_pruned
from oipipe.deploy.build import BuildContext
from oipipe.deploy.runtime import load_artifact
from oipipe.measure import evaluation
from oipipe.training import models
cfg = load_params(Path(sys.argv[1]))
model, meta = models.load_trained(path(cfg, "checkpoint"))
images, _ = evaluation.images(path(cfg, "prepared"), ["test"], meta)
ctx = BuildContext(cfg, "openvino_pruned_fp32", VARIANTS["openvino_pruned_fp32"], model, meta,
                   images[:2].clone(), lambda: iter(()), path(cfg, "exported"))
pruned, facts = build_pruned.pruned_model(ctx)  # from the cache the stage left
convs = {n: m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
runtime, _ = load_artifact(path(cfg, "optimized") / "openvino_pruned_fp32")
with torch.no_grad():
    want = pruned(images).numpy()
got = runtime(images)
print(json.dumps({
    "params": sum(p.numel() for p in pruned.parameters()),
    "depthwise_ok": all(m.in_channels == m.out_channels == m.groups
                        for m in convs.values() if m.groups > 1),
    "widths": {n: m.out_channels for n, m in convs.items()},
    "shape": list(got.shape),
    "diff": float(np.abs(got - want).max()),
    "scale": float(np.abs(want).max()),
}))
"""


@pytest.mark.slow
def test_pruning_removes_channels_and_the_ir_gives_the_pruned_models_logits(
    exported_onnx, prepared, trained, tmp_path
) -> None:
    cfg = config(tmp_path, prepared, trained)
    copy_export(exported_onnx, cfg)
    params = write_params(cfg, tmp_path / "params.yaml")
    records = {}
    for v in ("openvino_pruned_fp32", "openvino_pruned_int8"):
        res = run_stage("optimize", params, "--variant", v)
        assert res.returncode == 0, res.stderr[-3000:]
        records[v] = json.loads((path(cfg, "optimized") / v / "record.json").read_text())
        assert records[v]["status"] == "ok", records[v]["error"]
    fp32, int8 = records["openvino_pruned_fp32"], records["openvino_pruned_int8"]

    # the record: fewer parameters and FLOPs, channels before and after, the fine-tune
    assert fp32["params_after"] < 0.75 * fp32["params_before"]
    assert fp32["gflops_after"] < 0.75 * fp32["gflops_before"]
    before, after = fp32["channels_before"], fp32["channels_after"]
    assert before.keys() == after.keys()
    shrunk = [k for k in before if after[k] < before[k]]
    assert len(shrunk) == fp32["pruned_layers"] > len(before) // 2
    for k in shrunk:  # about RATIO of them gone, widths rounded to round_to (8)
        assert after[k] % 8 == 0 or after[k] < 8
        assert after[k] <= round((1 - RATIO) * before[k]) + 8
    assert fp32["pruned_epochs_run"] == 1 and fp32["pruned_best_epoch"] in (0, 1)
    # the int8 variant quantized the same fine-tuned model (from the cache), not a second one
    assert not fp32["pruned_from_cache"] and int8["pruned_from_cache"]
    for k in ("params_after", "channels_after", "pruned_val_losses", "pruned_best_epoch"):
        assert int8[k] == fp32[k], k
    assert int8["int8_layers"] > 10 and int8["calibration_images"] == 16
    assert int8["verdict"] in ("pass", "undecided", "fail")

    res = subprocess.run(
        [sys.executable, "-c", CHECK, str(params)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["params"] == fp32["params_after"]
    assert got["widths"] == after  # the model the record describes
    assert got["depthwise_ok"]  # each depthwise convolution lost its group with the channel
    labels = (path(cfg, "prepared") / "labels.txt").read_text().splitlines()
    assert got["shape"] == [got["shape"][0], len(labels)]  # the classifier was left whole
    assert got["diff"] <= 1e-3 * max(1.0, got["scale"])  # the IR is the pruned model


@pytest.mark.slow
def test_the_accuracy_budget_int8_is_steered_by_the_validation_split_and_judged(
    exported_onnx, prepared, trained, tmp_path
) -> None:
    """openvino_ac_int8: NNCF's accuracy-controlled int8 validates on the val split only, keeps
    int8 layers, and is judged on val + test like every variant."""
    cfg = config(tmp_path, prepared, trained, "optimize.settings.openvino_ac_int8.max_iterations=2")
    copy_export(exported_onnx, cfg)
    params = write_params(cfg, tmp_path / "params.yaml")
    res = run_stage("optimize", params, "--variant", "openvino_ac_int8")
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((path(cfg, "optimized") / "openvino_ac_int8" / "record.json").read_text())
    assert rec["status"] == "ok", rec["error"]
    val = len((path(cfg, "prepared") / "val.csv").read_text().strip().splitlines()) - 1
    assert rec["accuracy_control_images"] == val > 0  # the validation split, not test
    assert rec["eval_images"] > val  # judged on val + test
    assert rec["int8_layers"] > 10 and rec["fake_quantize_nodes"] > 10
    assert rec["verdict"] in ("pass", "undecided", "fail")
