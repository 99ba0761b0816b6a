"""Build function of the Torch-TensorRT variants (fp32, fp16) and the compile settings as
plain data, testable without a GPU (`trt_compile_settings`). Named by the rows of
`oipipe.core.variants`; never run on the machines this was written on (no CUDA, no TensorRT)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from oipipe.core import progress
from oipipe.core.errors import ConfigError
from oipipe.deploy import trt_layers
from oipipe.deploy.build import BuildContext, BuildFailed
from oipipe.measure import evaluation

log = logging.getLogger("oipipe.deploy.build_tensorrt")


def trt_compile_settings(
    precision: str, input_size: int, trt: DictConfig | dict, max_export_batch: int
) -> dict:
    """Everything `torch_tensorrt.dynamo.compile` is called with, as plain data (testable here).

    FP16 is built by casting the model and its inputs to half (explicit typing). Since
    Torch-TensorRT 2.13 the dynamo path ignores `enabled_precisions={torch.half}` without a
    word and builds FP32, so it is never passed; the build then checks the engine's layers
    (`oipipe.deploy.trt_layers`) and the output dtype.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"unknown TensorRT precision {precision!r}; expected 'fp32' or 'fp16'")
    lo, opt, hi = int(trt["min_batch"]), int(trt["opt_batch"]), int(trt["max_batch"])
    if not 1 <= lo <= opt <= hi <= max_export_batch:
        raise ConfigError(
            f"optimize.trt batch range needs 1 <= min_batch ({lo}) <= opt_batch "
            f"({opt}) <= max_batch ({hi}) <= export.max_batch ({max_export_batch})"
        )
    shape = (3, input_size, input_size)
    return {
        "dtype": torch.float16 if precision == "fp16" else torch.float32,
        "input": {"min_shape": (lo, *shape), "opt_shape": (opt, *shape), "max_shape": (hi, *shape)},
        # The engine's optimisation profile follows the exported program's example, not
        # Input.opt_shape: export from opt_batch real images (evaluation.fill).
        "export_batch": opt,
        "kwargs": {
            "min_block_size": int(trt["min_block_size"]),
            "use_fp32_acc": precision == "fp16" and bool(trt["fp32_accumulation"]),
            # fp32 means fp32: TensorRT runs matmuls and convolutions in TF32 on Ampere
            # and later unless told not to (disable_tf32 defaults to False)
            "disable_tf32": precision == "fp32",
            # everything in TensorRT, or the build fails: a graph left partly in PyTorch
            # would still return the cast dtype and pass the output-dtype check
            "require_full_compilation": True,
        },
        "also_torchscript": bool(trt["also_torchscript"]),
    }


def engine(ctx: BuildContext, dst: Path) -> None:
    """A Torch-TensorRT engine of the whole model in the row's precision, saved as an
    ExportedProgram (and TorchScript when optimize.trt.also_torchscript)."""
    import tempfile

    import torch_tensorrt

    precision = ctx.variant.precision
    s = trt_compile_settings(
        precision, ctx.meta["input_size"], ctx.cfg.optimize.trt, ctx.cfg.export.max_batch
    )
    dtype = s["dtype"]
    model = copy.deepcopy(ctx.model).to("cuda", dtype)
    example = evaluation.fill(ctx.example, s["export_batch"]).to("cuda", dtype)
    ep = ctx.export(model, example)
    spec = [torch_tensorrt.Input(**s["input"], dtype=dtype)]
    # The output dtype cannot tell FP16 from FP32 under strong typing; the engine's layers
    # can. Their details exist only at ProfilingVerbosity.DETAILED, which Torch-TensorRT sets
    # only inside its Debugger; save_layer_info writes them to engine_layer_info.json there
    # (Torch-TensorRT 2.9 to 2.14, see oipipe/deploy/trt_layers.py). The Debugger replaces the
    # root logger's handlers on entry and on exit (logging.config.dictConfig); the stage's are
    # put back after it.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with tempfile.TemporaryDirectory(prefix="trt_layers_") as logs:
        try:
            with (
                progress.phase(log, "building the TensorRT engine"),
                torch_tensorrt.dynamo.Debugger(
                    log_level="info",
                    logging_dir=logs,
                    save_layer_info=True,
                    engine_builder_monitor=False,
                ),
            ):
                trt_gm = torch_tensorrt.dynamo.compile(ep, arg_inputs=spec, **s["kwargs"])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        # require_full_compilation already makes the compile raise rather than leave a piece
        # to PyTorch; one engine, too, because the layer file holds the last engine built
        engines = trt_layers.tensorrt_submodules(trt_gm)
        fallback = trt_layers.torch_fallback_submodules(trt_gm)
        if fallback or len(engines) != 1:
            raise BuildFailed(
                f"TensorRT was to run the whole model as one engine; "
                f"Torch-TensorRT built {engines} and left {fallback} to PyTorch"
            )
        info = trt_layers.layer_info_file(logs).read_text(encoding="utf-8")
    counts = trt_layers.layer_precisions(info)  # recorded even if the check below fails
    ctx.notes["trt_layers"] = counts["layers"]
    ctx.notes["trt_convolutions"] = counts["convolutions"]
    if precision == "fp16":
        try:
            trt_layers.check_fp16(info)
        except trt_layers.LayerPrecisionError as e:
            raise BuildFailed(str(e)) from e
    with torch.no_grad():
        out = trt_gm(example)
    ctx.notes["output_dtype"] = str(out.dtype)
    if out.dtype != dtype:
        raise BuildFailed(f"TensorRT was asked for {precision} and returned {out.dtype}")
    # The ExportedProgram is what the pipeline loads (torch.export.load after importing
    # torch_tensorrt); TorchScript, when asked for, is written beside it for deployments
    torch_tensorrt.save(trt_gm, str(dst), output_format="exported_program", arg_inputs=spec)
    if s["also_torchscript"]:  # traced with torch.jit.trace: real tensors, not Input specs
        torch_tensorrt.save(
            trt_gm, str(dst.with_suffix(".ts")), output_format="torchscript", arg_inputs=[example]
        )
