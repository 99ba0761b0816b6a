"""Stage `optimize`: every CPU variant built, reloaded, and given its paired accuracy verdict."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_export, logits_in_fresh_process, on_trained, run_stage, write_params
from omegaconf import OmegaConf

from oipipe.core.config import compose, path
from oipipe.core.errors import ConfigError, InputError
from oipipe.core.files import read_csv
from oipipe.core.variants import OPTIMIZE_VARIANTS, VARIANTS
from oipipe.deploy import build, build_tensorrt, build_torch, runtime
from oipipe.measure import evaluation, machine
from oipipe.measure.machine import cpu_has_native_bf16
from oipipe.training import models
from stages import optimize

# On a CPU without AVX512-BF16 or AMX, openvino_bf16 is skipped (OpenVINO does not emulate bf16)
# and so are eager_bf16 and inductor_bf16 unless optimize.allow_emulated (their emulation is many
# times slower than fp32): test_bf16_variants_are_skipped_where_bf16_is_emulated and
# test_allow_emulated_builds_a_bf16_variant_anyway. These machines differ, so ask this one.
NATIVE_BF16 = cpu_has_native_bf16()
OPENVINO = [
    "openvino_fp32",
    *(["openvino_bf16"] if NATIVE_BF16 else []),
    "openvino_int8",
    "openvino_qdq_int8",
]
CPU_VARIANTS = [
    *(["eager_bf16"] if NATIVE_BF16 else []),
    "inductor_fp32",
    *(["inductor_bf16"] if NATIVE_BF16 else []),
    "inductor_int8",
    "onnxruntime_fp32",
    "onnxruntime_int8",
    *OPENVINO,
]
HAS_TRT = build.missing(("torch_tensorrt", "cuda")) is None


def base(root: Path, prepared: Path, trained: Path, *overrides: str) -> list[str]:
    return on_trained(
        root,
        prepared,
        trained,
        "export.verify_batch_sizes=[1,2]",
        "optimize.calibration_images=32",
        *overrides,
    )


@pytest.fixture(scope="module")
def exported_root(exported_onnx, prepared, trained, tmp_path_factory) -> Path:
    """The module's output root, holding the export stage's ONNX (the only format a variant
    reads)."""
    root = tmp_path_factory.mktemp("optimize")
    copy_export(exported_onnx, compose(base(root, prepared, trained)))
    return root


@pytest.fixture(scope="module")
def cfg(exported_root, prepared, trained):
    return compose(base(exported_root, prepared, trained))


@pytest.fixture(scope="module")
def built(cfg, tmp_path_factory) -> dict[str, dict]:
    """Every CPU variant built once, in the module's output root.

    The OpenVINO ones are built by the stage's entry point in a fresh process, as DVC runs every
    stage: with OpenVINO (its TBB threads) loaded in the pytest process, the next training test
    died with a segmentation fault in a finalizer. The pytest process never loads OpenVINO."""
    params = write_params(cfg, tmp_path_factory.mktemp("ov") / "params.yaml")
    out = {}
    for v in CPU_VARIANTS:
        if v in OPENVINO:
            res = run_stage("optimize", params, "--variant", v)
            assert res.returncode == 0, res.stderr[-3000:]
            out[v] = json.loads((path(cfg, "optimized") / v / runtime.RECORD).read_text())
        else:
            out[v] = optimize.run(cfg, v)
    return out


def test_registry_and_config_name_the_same_variants() -> None:
    assert set(VARIANTS) == set(OPTIMIZE_VARIANTS)
    assert set(compose().optimize.variants) <= set(OPTIMIZE_VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_cpu_variant_builds_reloads_and_passes_its_accuracy_bar(built, cfg, name) -> None:
    rec = built[name]
    assert rec["status"] == "ok", rec["error"]
    assert rec["precision"] == VARIANTS[name].precision
    assert rec["verdict"] in ("pass", "undecided"), rec["verdict_reason"]
    # measured on every image the model did not train on, and it says so
    held_out = sum(len(read_csv(path(cfg, "prepared") / f"{s}.csv")) for s in ("val", "test"))
    assert rec["eval_splits"] == ["val", "test"] and rec["eval_images"] == held_out
    assert rec["top1_ci_low_pct"] <= rec["top1_pct"] <= rec["top1_ci_high_pct"]
    assert rec["top1_delta_ci_low_pct"] <= rec["top1_delta_pct"] <= rec["top1_delta_ci_high_pct"]
    assert rec["agreement_ci_low_pct"] <= rec["agreement_pct"] <= rec["agreement_ci_high_pct"]
    assert rec["top1_delta_pct"] == pytest.approx(
        100 * (rec["discordant_better"] - rec["discordant_worse"]) / held_out, abs=1e-3
    )
    folder = path(cfg, "optimized") / name
    artifact = path(cfg, "root") / rec["artifact"]
    assert artifact.parent == folder and optimize.artifact_bytes(artifact) / 2**20 == pytest.approx(
        rec["size_mb"], abs=1e-3
    )
    assert rec["build_seconds"] >= 0  # onnxruntime_fp32 copies the exported file: ~0 s
    if rec["backend"] == "aot_inductor":
        assert rec["build_seconds"] > 1  # generates and compiles C++
    assert json.loads((folder / "record.json").read_text()) == rec
    assert json.loads((path(cfg, "metrics") / "optimize" / f"{name}.json").read_text()) == rec
    if rec["precision"] == "int8":
        assert rec["calibration_images"] == 32
    if name == "inductor_int8":  # real oneDNN int8 kernels, not a silent fp32 fallback
        assert rec["int8_kernels"] > 10


@pytest.mark.slow
def test_an_int8_package_without_int8_kernels_is_a_failed_build(
    built, cfg, exported_root, prepared, trained, tmp_path, monkeypatch
) -> None:
    """The guard against Inductor's silent fp32 fallback (pytorch/ao#4566): a real fp32
    AOTInductor package (inductor_fp32's) counts no int8 kernel where inductor_int8's counts its
    own; handed to build_torch.inductor_int8 as if its compile had fallen back, the variant is
    `failed` with the guard's message, and no artifact is left beside the record. Written beside,
    not over, the module's built variants."""
    root = path(cfg, "root")
    fp32_package = root / built["inductor_fp32"]["artifact"]
    assert build_torch.count_int8_kernels(fp32_package) == 0
    assert (
        build_torch.count_int8_kernels(root / built["inductor_int8"]["artifact"])
        == built["inductor_int8"]["int8_kernels"]
        > 10
    )
    monkeypatch.setattr(
        build_torch, "aoti_package", lambda ep, dst: shutil.copyfile(fp32_package, dst)
    )
    elsewhere = compose(
        base(
            exported_root,
            prepared,
            trained,
            f"paths.optimized={tmp_path / 'opt'}",
            f"paths.metrics={tmp_path / 'metrics'}",
        )
    )
    rec = optimize.run(elsewhere, "inductor_int8")
    assert (rec["status"], rec["int8_kernels"], rec["artifact"], rec["size_mb"]) == (
        "failed",
        0,
        None,
        None,
    ), rec
    assert rec["error"].startswith(
        "BuildFailed: the AOTInductor package has no int8 (qconv/qlinear) kernel"
    ), rec["error"]
    assert "top1_pct" not in rec and rec["calibration_images"] == 32  # calibrated, then refused
    folder = tmp_path / "opt" / "inductor_int8"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "record.json"]
    assert json.loads((folder / "record.json").read_text()) == rec
    with pytest.raises(InputError, match="variant inductor_int8 is failed: BuildFailed"):
        runtime.load_variant(folder)


def _meta(cfg) -> dict:
    return json.loads((path(cfg, "exported") / "meta.json").read_text())


@pytest.mark.slow
def test_quantized_and_low_precision_artifacts_differ_from_fp32(built) -> None:
    # a variant that silently returned the fp32 model would pass any accuracy bar
    assert built["inductor_int8"]["max_abs_logit_diff"] > 1e-3
    assert built["onnxruntime_int8"]["max_abs_logit_diff"] > 1e-3
    if NATIVE_BF16:  # elsewhere: test_allow_emulated_builds_a_bf16_variant_anyway
        assert built["eager_bf16"]["max_abs_logit_diff"] > 1e-4
    assert built["onnxruntime_fp32"]["max_abs_logit_diff"] < 1e-3
    assert built["onnxruntime_int8"]["size_mb"] < 0.5 * built["onnxruntime_fp32"]["size_mb"]
    assert built["openvino_int8"]["max_abs_logit_diff"] > 1e-3
    if NATIVE_BF16:
        assert built["openvino_bf16"]["max_abs_logit_diff"] > 1e-4
    assert built["openvino_fp32"]["max_abs_logit_diff"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", OPENVINO)
def test_openvino_variants_compile_what_their_name_says(
    built, cfg, trained, tmp_path, name
) -> None:
    """Loaded alone from the IR on disk (in a fresh process, see `built`): metadata from
    rt_info, batch 1 and 5 (dynamic), fp32 logits close to PyTorch's, and the precision
    OpenVINO compiled is the one named."""
    rec, folder = built[name], path(cfg, "optimized") / name
    assert rec["status"] == "ok", rec["error"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "model.bin",
        "model.xml",
        "record.json",
    ]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == _meta(cfg)
    model, _ = models.load_trained(trained)
    images, _ = evaluation.images(path(cfg, "prepared"), ["test"], meta)
    with torch.no_grad():
        fp32 = model(images[:5]).numpy()
    got = logits_in_fresh_process(
        images[:5],
        folder,
        tmp_path,
        """
import openvino.properties.hint as hints
from oipipe.deploy import runtime
rt, meta, record = runtime.load_variant(d)
assert json.loads(rt.extra["meta.json"]) == meta, rt.extra
compiled, _ = runtime.openvino_compile(d / "model.xml", record["precision"])
out["precision"] = [ord(c) for c in compiled.get_property(hints.inference_precision).to_string()]
out["b1"], out["b5"] = rt(x[:1]), rt(x)""",
    )
    precision = runtime.OPENVINO_PRECISIONS[rec["precision"]]
    assert "".join(map(chr, got["precision"].astype(int))) == precision
    assert rec["inference_precision"] == precision and rec["performance_hint"] == "LATENCY"
    assert rec["streams"] == 1  # LATENCY: one stream, every thread on one request
    assert got["b1"].shape == fp32[:1].shape and got["b5"].shape == fp32.shape
    np.testing.assert_allclose(got["b1"][0], got["b5"][0], rtol=1e-3, atol=1e-3)
    if name == "openvino_fp32":
        np.testing.assert_allclose(got["b5"], fp32, rtol=1e-4, atol=1e-4)
    if name in ("openvino_int8", "openvino_qdq_int8"):
        assert rec["calibration_images"] == 32 and rec["int8_layers"] > 10
    else:
        assert rec["int8_layers"] == 0


@pytest.mark.slow
def test_openvino_throughput_mode_runs_its_own_streams(built, cfg, tmp_path) -> None:
    """The benchmark's throughput mode for an OpenVINO IR: THROUGHPUT hint with the streams
    asked, an AsyncInferQueue; run in a fresh process (see `built`)."""
    folder = path(cfg, "optimized") / "openvino_fp32"
    images, _ = evaluation.images(path(cfg, "prepared"), ["test"], _meta(cfg))
    got = logits_in_fresh_process(
        images[:8],
        folder,
        tmp_path,
        """
from oipipe.measure import timing
rec = json.loads((d / "record.json").read_text())
p = {"warmup_iters": 1, "warmup_seconds": 0.0, "min_iters": 6, "min_seconds": 0.1, "trials": 2}
r = timing.time_openvino_async(d, rec, [x[:4], x[4:]], p, threads=2, streams=2)
out["r"] = [r[k] for k in ("throughput_concurrent", "throughput_concurrent_min",
                           "throughput_concurrent_max", "concurrency")]
out["method"] = [ord(c) for c in r["concurrency_method"]]""",
    )
    rate, low, high, streams = got["r"]
    assert streams == 2 and 0 < low <= rate <= high
    method = "".join(map(chr, got["method"].astype(int)))
    assert method.startswith("OpenVINO THROUGHPUT hint: 2 streams, AsyncInferQueue of "), method


def test_openvino_bf16_is_skipped_without_native_bf16(
    exported_root, prepared, trained, tmp_path, monkeypatch
) -> None:
    """What a CPU without AVX512-BF16 or AMX records (this one is asked to say it has none);
    written beside, not over, the module's built variants."""
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: False)
    cfg = compose(
        base(
            exported_root,
            prepared,
            trained,
            f"paths.optimized={tmp_path / 'opt'}",
            f"paths.metrics={tmp_path / 'metrics'}",
        )
    )
    rec = optimize.run(cfg, "openvino_bf16")
    assert rec["status"] == "skipped" and "no native bf16" in rec["reason"], rec
    # OpenVINO cannot emulate it: asking for emulation does not build an fp32 under a bf16 name
    allowed = compose(
        base(
            exported_root,
            prepared,
            trained,
            f"paths.optimized={tmp_path / 'opt'}",
            f"paths.metrics={tmp_path / 'metrics'}",
            "optimize.allow_emulated=true",
        )
    )
    rec = optimize.run(allowed, "openvino_bf16")
    assert rec["status"] == "skipped" and "no native bf16" in rec["reason"], rec


@pytest.mark.parametrize("name", ["eager_bf16", "inductor_bf16"])
def test_bf16_variants_are_skipped_where_bf16_is_emulated(
    exported_root, prepared, trained, tmp_path, monkeypatch, name
) -> None:
    """A CPU without AVX512-BF16 or AMX (this one is told it has neither): skipped before any
    build, the reason naming the missing flags, the cost measured here and how to build anyway."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_vnni"})
    cfg = compose(
        base(
            exported_root,
            prepared,
            trained,
            f"paths.optimized={tmp_path / 'opt'}",
            f"paths.metrics={tmp_path / 'metrics'}",
        )
    )
    rec = optimize.run(cfg, name)
    assert rec["status"] == "skipped" and rec["artifact"] is None, rec
    assert rec["build_seconds"] is None and "top1_pct" not in rec, rec
    reason = rec["reason"]
    assert "neither avx512_bf16 nor amx_bf16" in reason, reason
    slowdown = float(re.search(r"a bf16 convolution ran ([0-9.]+)x slower than fp32", reason)[1])
    assert slowdown == pytest.approx(machine.bf16_conv_slowdown(), abs=0.05), reason
    assert "optimize.allow_emulated=true" in reason, reason
    # with either flag nothing changes: the requirement is met
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert build.missing(VARIANTS[name].requires) is None
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "amx_tile", "amx_bf16"})
    assert build.missing(VARIANTS[name].requires) is None


@pytest.mark.slow
def test_allow_emulated_builds_a_bf16_variant_anyway(
    exported_root, prepared, trained, tmp_path, monkeypatch
) -> None:
    """Asked for (`optimize.allow_emulated=true`), eager_bf16 is built and judged on a CPU told it
    has no native bf16, and its record says the bf16 was not native."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma"})
    cfg = compose(
        base(
            exported_root,
            prepared,
            trained,
            f"paths.optimized={tmp_path / 'opt'}",
            f"paths.metrics={tmp_path / 'metrics'}",
            "optimize.allow_emulated=true",
        )
    )
    rec = optimize.run(cfg, "eager_bf16")
    assert rec["status"] == "ok", rec
    assert rec["native_bf16"] is False and rec["precision"] == "bf16", rec
    assert rec["max_abs_logit_diff"] > 1e-4, rec  # it really ran in bf16
    assert rec["verdict"] in ("pass", "undecided"), rec


@pytest.mark.slow
def test_variants_reload_alone_in_a_fresh_process(built, cfg, trained, tmp_path) -> None:
    model, _ = models.load_trained(trained)
    images, _ = evaluation.images(path(cfg, "prepared"), ["test"], _meta(cfg))
    x = images[:5]  # real test images, batch 5: a size no build saw
    with torch.no_grad():
        fp32 = model(x).numpy()
    got = logits_in_fresh_process(
        x,
        path(cfg, "optimized"),
        tmp_path,
        (
            "from oipipe.deploy.runtime import load_artifact\n"
            "for v in sorted(d.iterdir()):\n"
            "    if json.loads((v / 'record.json').read_text())['status'] == 'ok':\n"
            "        out[v.name] = load_artifact(v)[0](x)"
        ),
    )
    assert set(got) >= set(CPU_VARIANTS)
    for name in CPU_VARIANTS:
        fresh = got[name]
        if name not in OPENVINO:  # never loaded in this process (see `built`)
            here = runtime.load_artifact(path(cfg, "optimized") / name)[0](x)
            np.testing.assert_allclose(fresh, here, rtol=1e-5, atol=1e-5, err_msg=name)
        # and close to fp32 within what the record measured on the whole test split
        bound = max(1e-4, 1.5 * built[name]["max_abs_logit_diff"])
        assert np.abs(fresh - fp32).max() <= bound, name


@pytest.mark.slow
def test_load_artifact_takes_any_artifact_and_imports_only_what_it_needs(
    built, cfg, trained, tmp_path
) -> None:
    """A variant's folder or its file, an exported file, the checkpoint: the same logits and
    metadata; an ONNX file loads without torchvision, timm or build code (an edge box)."""
    opt, exported = path(cfg, "optimized"), path(cfg, "exported")
    model, meta = models.load_trained(trained)
    images, _ = evaluation.images(path(cfg, "prepared"), ["test"], meta)
    x = images[:3]
    with torch.no_grad():
        fp32 = model(x).numpy()
    got = logits_in_fresh_process(
        x,
        opt,
        tmp_path,
        f"""
from oipipe.deploy.runtime import load_artifact
rt, meta = load_artifact(Path({str(exported / "model.onnx")!r}))
out["onnx"] = rt(x)
out["heavy"] = [m in sys.modules for m in ("torchvision", "timm", "torchao",
                                   "oipipe.training.models",
                                           "stages.optimize", "stages.export", "onnx")]
out["folder"] = load_artifact(d / "onnxruntime_int8")[0](x)
out["file"] = load_artifact(d / "onnxruntime_int8" / "model.onnx")[0](x)
out["classes"] = [len(meta["classes"]), meta["input_size"]]""",
    )
    assert got["heavy"].tolist() == [False] * 7
    assert got["classes"].tolist() == [len(meta["classes"]), meta["input_size"]]
    np.testing.assert_allclose(got["onnx"], fp32, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["folder"], got["file"])
    rt, loaded = runtime.load_artifact(trained)
    assert loaded == meta
    np.testing.assert_allclose(rt(x), fp32, rtol=1e-4, atol=1e-4)
    assert rt.prepare(x).is_contiguous(memory_format=torch.channels_last)
    nchw, _ = runtime.load_artifact(trained, channels_last=False)
    assert nchw.prepare(x).is_contiguous()
    for bad, why in (
        (tmp_path / "nothing", "does not exist"),
        (exported, "a folder without record.json: name one of its artifacts (model.onnx)"),
        (exported / "meta.json", "not an artifact of the pipeline"),
        (_skipped(tmp_path / "trt_fp16"), "variant trt_fp16 is skipped: no GPU"),
    ):
        with pytest.raises(InputError, match=re.escape(why)):
            runtime.load_artifact(bad)
    stray = tmp_path / "inductor_int8"
    shutil.copytree(opt / "inductor_int8", stray)
    (stray / "model.onnx").write_bytes((exported / "model.onnx").read_bytes())
    with pytest.raises(InputError, match="is not the artifact of variant inductor_int8"):
        runtime.load_artifact(stray / "model.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InputError, match="broken.onnx cannot be loaded as onnx"):
        runtime.load_artifact(broken)


def _skipped(folder: Path) -> Path:
    folder.mkdir()
    (folder / "record.json").write_text(
        json.dumps({"variant": "trt_fp16", "status": "skipped", "reason": "no GPU"})
    )
    return folder


@pytest.mark.skipif(HAS_TRT, reason="CUDA and torch_tensorrt are present: the build runs instead")
@pytest.mark.parametrize("name", ["trt_fp32", "trt_fp16"])
def test_tensorrt_variants_record_an_honest_skip_without_cuda_or_tensorrt(cfg, name) -> None:
    rec = optimize.run(cfg, name)
    assert rec["status"] == "skipped"
    assert rec["reason"] in ("no CUDA device", build.missing(("torch_tensorrt",)))
    assert rec["artifact"] is None and "top1_pct" not in rec
    folder = path(cfg, "optimized") / name
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "record.json"]
    with pytest.raises(InputError, match="is skipped"):
        runtime.load_variant(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the builds run instead")
@pytest.mark.parametrize("name", ["eager_fp16_cuda", "inductor_fp16_cuda"])
def test_cuda_variants_record_an_honest_skip_without_a_gpu(cfg, name) -> None:
    rec = optimize.run(cfg, name)
    assert (rec["status"], rec["reason"], rec["artifact"]) == ("skipped", "no CUDA device", None)
    with pytest.raises(InputError, match="is skipped"):
        runtime.load_variant(path(cfg, "optimized") / name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["eager_fp16_cuda", "inductor_fp16_cuda"])
def test_cuda_variants_build_and_hold_their_bar_on_a_gpu(cfg, name) -> None:
    rec = optimize.run(cfg, name)
    assert rec["status"] == "ok", rec["error"]
    assert rec["precision"] == "fp16" and rec["verdict"] != "fail", rec["verdict_reason"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_TRT,
    reason=f"TensorRT build needs CUDA and torch_tensorrt: {build.missing(('torch_tensorrt',))}",
)
@pytest.mark.parametrize("name", ["trt_fp32", "trt_fp16"])
def test_tensorrt_variants_build_on_a_gpu(cfg, name) -> None:
    rec = optimize.run(cfg, name)
    assert rec["status"] == "ok", rec["error"]
    assert rec["output_dtype"] == ("torch.float16" if name == "trt_fp16" else "torch.float32")
    assert rec["verdict"] != "fail", rec["verdict_reason"]


def test_tensorrt_settings_are_built_without_a_gpu() -> None:
    trt = compose().optimize.trt
    fp16 = build_tensorrt.trt_compile_settings("fp16", 224, trt, 256)
    fp32 = build_tensorrt.trt_compile_settings("fp32", 224, trt, 256)
    assert fp16["dtype"] == torch.float16 and fp32["dtype"] == torch.float32
    # enabled_precisions is silently ignored since Torch-TensorRT 2.13: never rely on it
    assert "enabled_precisions" not in fp16["kwargs"]
    assert fp16["input"] == {
        "min_shape": (1, 3, 224, 224),
        "opt_shape": (32, 3, 224, 224),
        "max_shape": (128, 3, 224, 224),
    }
    assert fp16["also_torchscript"] is False
    # the engine is tuned for the export example's batch: export from opt_batch images
    assert fp16["export_batch"] == 32 == fp16["input"]["opt_shape"][0]
    example = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    big = evaluation.fill(example, fp16["export_batch"])
    assert big.shape == (32, 3, 2, 2) and torch.equal(big[5:10], example)
    assert evaluation.fill(example, 2).shape[0] == 2
    # fp32 is not TF32; no graph is left partly in PyTorch
    assert fp32["kwargs"]["disable_tf32"] is True and fp16["kwargs"]["disable_tf32"] is False
    assert fp16["kwargs"]["require_full_compilation"] is True
    bad = {**trt, "opt_batch": 512, "max_batch": 512}
    with pytest.raises(ConfigError, match="export.max_batch"):
        build_tensorrt.trt_compile_settings("fp16", 224, bad, 256)
    with pytest.raises(ValueError, match="unknown TensorRT precision"):
        build_tensorrt.trt_compile_settings("int8", 224, trt, 256)


@pytest.mark.slow
def test_a_variant_that_fails_is_recorded_and_leaves_the_others(built, cfg, tmp_path) -> None:
    # a real failure: ONNX Runtime cannot parse a truncated model
    root = tmp_path / "root"
    (root / "artifacts" / "exported").mkdir(parents=True)
    good = path(cfg, "exported") / "model.onnx"
    (root / "artifacts" / "exported" / "model.onnx").write_bytes(good.read_bytes()[:4096])
    (root / "artifacts" / "optimized").symlink_to(path(cfg, "optimized"), target_is_directory=True)
    before = (path(cfg, "optimized") / "inductor_int8" / "model.pt2").read_bytes()
    broken = compose([*_overrides(cfg), f"paths.root={root}", "paths.metrics=metrics"])
    rec = optimize.run(broken, "onnxruntime_fp32")
    assert rec["status"] == "failed" and "onnx" in rec["error"].lower()
    folder = path(cfg, "optimized") / "onnxruntime_fp32"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "record.json"]
    assert (path(cfg, "optimized") / "inductor_int8" / "model.pt2").read_bytes() == before
    optimize.run(cfg, "onnxruntime_fp32")  # restore it for the other tests


def _overrides(cfg) -> list[str]:
    return [
        f"paths.prepared={cfg.paths.prepared}",
        f"paths.models={cfg.paths.models}",
        "data=mirror",
        "tracking.enabled=false",
        "optimize.calibration_images=32",
    ]


def _logits(labels: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """One-hot logits that are right except where `wrong` is set (then the next class)."""
    pred = np.where(wrong, (labels + 1) % 3, labels)
    return np.eye(3)[pred].astype(np.float32)


def test_a_variant_better_than_fp32_passes() -> None:
    # the case: +1 image of 37 was marked OUTSIDE a two-sided 1.5-point bar
    labels = np.arange(37) % 3
    fp32_wrong = np.zeros(37, bool)
    fp32_wrong[:7] = True
    better = fp32_wrong.copy()
    better[0] = False
    acc = evaluation.against_fp32(_logits(labels, fp32_wrong), _logits(labels, better), labels, 1.5)
    assert acc["top1_delta_pct"] == pytest.approx(100 / 37, abs=1e-3)
    assert acc["verdict"] == "pass", acc["verdict_reason"]
    assert (acc["discordant_better"], acc["discordant_worse"]) == (1, 0)


def test_a_variant_that_flips_many_predictions_fails() -> None:
    labels = np.arange(200) % 3
    fp32_wrong = np.zeros(200, bool)
    fp32_wrong[:10] = True
    flipped = fp32_wrong.copy()
    flipped[10:40] = True  # 30 more wrong: -15 points
    acc = evaluation.against_fp32(
        _logits(labels, fp32_wrong), _logits(labels, flipped), labels, 1.5
    )
    assert acc["verdict"] == "fail", acc["verdict_reason"]
    assert acc["top1_delta_ci_high_pct"] < -1.5 and acc["agreement_pct"] == 85.0
    assert acc["mcnemar_p"] < 1e-6
    # a few flips on few images cannot be decided, and the record says how many would
    few = fp32_wrong[:37].copy()
    few[10:12] = True
    acc = evaluation.against_fp32(
        _logits(labels[:37], fp32_wrong[:37]), _logits(labels[:37], few), labels[:37], 1.5
    )
    assert acc["verdict"] == "undecided" and acc["images_to_decide"] > 37


def test_calibration_on_a_small_training_split_uses_every_image(cfg) -> None:
    # 108 real photos and the default 128 calibration images: calibrate on all, do not stop
    train_images = len(read_csv(path(cfg, "prepared") / "train.csv"))
    gen = evaluation.calibration_batches(path(cfg, "prepared"), _meta(cfg), 100000, 4)
    seen = [len(b) for b in gen()]
    assert sum(seen) == train_images and max(seen) == 4
    assert (
        sum(
            len(b)
            for b in evaluation.calibration_batches(path(cfg, "prepared"), _meta(cfg), 5, 4)()
        )
        == 5
    )


def test_bad_inputs_are_clear_errors(cfg, trained, tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown variant 'tflite'"):
        optimize.run(cfg, "tflite")
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['tflite'\]"):
        compose(["optimize.variants=[inductor_int8,tflite]"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(trained.read_bytes()[:5000])
    with pytest.raises(models.WeightsError, match="cannot be read"):
        optimize.run(
            compose([*_overrides(cfg), f"paths.root={tmp_path}", f"paths.models={bad}"]),
            "onnxruntime_fp32",
        )
    with pytest.raises(models.WeightsError, match="does not exist"):
        optimize.run(
            compose(
                [*_overrides(cfg), f"paths.root={tmp_path}", f"paths.models={tmp_path / 'none'}"]
            ),
            "onnxruntime_fp32",
        )


@pytest.mark.slow
def test_entry_point_exit_codes(cfg, tmp_path) -> None:
    params = write_params(cfg, tmp_path / "params.yaml")
    res = run_stage("optimize", params, "--variant", "tflite")
    assert res.returncode == 2 and "unknown variant 'tflite'" in res.stderr
    res = run_stage("optimize", params, "--variant", "onnxruntime_int")
    assert res.returncode == 2 and "did you mean 'onnxruntime_int8'" in res.stderr
    res = run_stage("optimize", params, "--variant", "trt_fp16")
    assert res.returncode == 0, res.stderr
    rec = json.loads((path(cfg, "optimized") / "trt_fp16" / "record.json").read_text())
    assert rec["status"] == ("ok" if HAS_TRT else "skipped")


def test_openvino_qdq_int8_quantizes_with_onnxruntime_int8s_settings(cfg) -> None:
    """One block of settings for the one QDQ file both engines run: changing
    onnxruntime_int8's changes what openvino_qdq_int8 builds with."""
    changed = OmegaConf.merge(
        cfg, {"optimize": {"settings": {"onnxruntime_int8": {"per_channel": False}}}}
    )
    ctx = build.BuildContext(
        changed, "openvino_qdq_int8", VARIANTS["openvino_qdq_int8"], None, {}, None, None, None
    )
    assert ctx.settings == OmegaConf.to_container(changed.optimize.settings.onnxruntime_int8)
    assert ctx.settings["per_channel"] is False
    own = build.BuildContext(
        cfg, "openvino_int8", VARIANTS["openvino_int8"], None, {}, None, None, None
    )
    assert own.settings == OmegaConf.to_container(cfg.optimize.settings.openvino_int8)
