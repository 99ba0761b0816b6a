"""Stage `export`: TorchScript, ExportedProgram and ONNX, each verified against the eager model."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import logits_in_fresh_process

from oipipe.core.config import compose, path
from oipipe.core.errors import ConfigError
from oipipe.core.variants import FORMATS
from oipipe.deploy import runtime
from oipipe.training import models
from stages import export


@pytest.fixture
def export_cfg(prepared, trained, tmp_path):
    def make(*overrides: str):
        return compose(
            [
                "data=mirror",
                f"paths.root={tmp_path}",
                f"paths.prepared={prepared}",
                f"paths.models={trained.parent}",
                "tracking.enabled=false",
                "export.verify_batch_sizes=[1,8]",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="module")
def exported(prepared, trained, tmp_path_factory):
    """One export of every format, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("exported")
    cfg = compose(
        [
            "data=mirror",
            f"paths.root={root}",
            f"paths.prepared={prepared}",
            f"paths.models={trained.parent}",
            "tracking.enabled=false",
            "export.verify_batch_sizes=[1,8]",
        ]
    )
    return cfg, export.run(cfg)


@pytest.mark.slow
def test_every_format_is_exported_verified_and_carries_its_metadata(exported, trained) -> None:
    cfg, report = exported
    _, meta = models.load_trained(trained)
    out = path(cfg, "exported")
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["classes"] == ["Zebra", "Sea turtle", "Blue jay"] and meta["input_size"] == 64
    for fmt, row in FORMATS.items():
        assert (out / row.file).stat().st_size > 100_000
        assert report[f"{fmt}.ok"] is True
        for b in (1, 8):
            assert report[f"{fmt}.batch{b}.top1_agreement_pct"] == 100.0
            assert report[f"{fmt}.batch{b}.max_rel_diff"] <= 1e-4
        runner, loaded = runtime.load_artifact(out / row.file)
        assert loaded == meta
    assert json.loads((path(cfg, "metrics") / "export.json").read_text()) == report


@pytest.mark.slow
def test_files_have_the_usual_mode_and_the_program_keeps_only_its_example(exported) -> None:
    cfg, _ = exported
    out = path(cfg, "exported")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o666 & ~mask
    ep = torch.export.load(str(out / "model.pt2"))
    (example,), _ = ep.example_inputs
    assert example.untyped_storage().nbytes() == 2 * 3 * 64 * 64 * 4  # not the whole batch


@pytest.mark.slow
def test_artifacts_round_trip_in_a_fresh_process(exported, trained, tmp_path) -> None:
    cfg, _ = exported
    model, meta = models.load_trained(trained)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # batch 5: unseen
    with torch.no_grad():
        want = model(x).numpy()
    got = logits_in_fresh_process(
        x,
        path(cfg, "exported"),
        tmp_path,
        (
            "from oipipe.core.variants import FORMATS\n"
            "from oipipe.deploy.runtime import load_artifact\n"
            "for f, row in FORMATS.items():\n"
            "    out[f] = load_artifact(d / row.file)[0](x)"
        ),
    )
    for fmt in FORMATS:
        np.testing.assert_allclose(got[fmt], want, rtol=1e-4, atol=1e-4 * abs(want).max())


def test_a_failed_check_fails_the_stage_after_writing_the_report(export_cfg) -> None:
    # freezing folds batch norms into convolutions: float rounding differs by ~1e-6, which a
    # tolerance of zero rejects
    cfg = export_cfg("export.formats=[torchscript]", "export.rtol=0")
    with pytest.raises(export.ExportCheckFailed, match="torchscript at batch 1"):
        export.run(cfg)
    report = json.loads((path(cfg, "metrics") / "export.json").read_text())
    assert report["torchscript.ok"] is False


def test_missing_corrupt_or_foreign_checkpoint_is_a_clear_error(
    export_cfg, trained, tmp_path
) -> None:
    with pytest.raises(models.WeightsError, match="does not exist: run the train stage first"):
        export.run(export_cfg(f"paths.models={tmp_path / 'none'}"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(trained.read_bytes()[:5000])
    with pytest.raises(models.WeightsError, match="cannot be read"):
        export.run(export_cfg(f"paths.models={bad}"))
    torch.save(models.create("resnet18").state_dict(), bad / "model.pt")
    with pytest.raises(models.WeightsError, match="not a checkpoint of the train stage"):
        export.run(export_cfg(f"paths.models={bad}"))


def test_unknown_format_and_low_opset_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown export format"):
        compose(["export.formats=[tflite]"])
    with pytest.raises(ConfigError, match="onnx_opset"):
        compose(["export.onnx_opset=11"])
