"""Build functions of the OpenVINO variants: the IR of the export stage's ONNX file (compiled
fp32 or bf16 by the consumer), NNCF's post-training int8 of it, and the IR of ONNX Runtime's QDQ
int8 file (the other engine-and-file pair: which of the two int8 IRs is faster depends on the
CPU). Each is `(ctx, dst)`, named by its variant's row in `oipipe.core.variants`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from oipipe.core import progress
from oipipe.core.variants import FORMATS
from oipipe.deploy.build import BuildContext, BuildFailed
from oipipe.deploy.runtime import OPENVINO_META, OPENVINO_PRECISIONS, openvino_compile
from oipipe.measure.machine import cpu_has_native_bf16

log = logging.getLogger("oipipe.deploy.build_openvino")


def openvino_ir(ctx: BuildContext, onnx: Path | None = None) -> Any:
    """An ONNX file (by default the export stage's) as an OpenVINO model: batch dynamic,
    meta.json in rt_info."""
    import openvino as ov

    return _finished(ctx, ov.convert_model(str(onnx or ctx.exported / FORMATS["onnx"].file)))


def ir_of_module(ctx: BuildContext, module: Any) -> Any:
    """A torch module (a pruned or fake-quantized model) as an OpenVINO model: traced on the
    context's example batch, batch dynamic, meta.json in rt_info."""
    import openvino as ov

    with progress.phase(log, "converting the model to an OpenVINO IR"):
        return _finished(ctx, ov.convert_model(module, example_input=ctx.example))


def _finished(ctx: BuildContext, model: Any) -> Any:
    """Batch dynamic (whatever the source said) and meta.json in rt_info."""
    size = ctx.meta["input_size"]
    model.reshape([-1, 3, size, size])
    model.set_rt_info(json.dumps(ctx.meta, sort_keys=True), list(OPENVINO_META))
    return model


def nncf_quantizer(ctx: BuildContext, tensors: str = "numpy") -> dict[str, Any]:
    """`optimize.settings.openvino_int8` as NNCF's keyword arguments, and the calibration batches
    (counted in the record) as its dataset, numpy arrays for an IR or `tensors="torch"` for a
    torch model: what every NNCF int8 here starts from."""
    import nncf

    settings = dict(ctx.cfg.optimize.settings["openvino_int8"])
    settings["preset"] = nncf.QuantizationPreset(settings["preset"])
    batches = [b.numpy() if tensors == "numpy" else b for b in ctx.calibration()]
    ctx.notes["calibration_images"] = sum(len(b) for b in batches)
    ctx.notes["nncf_version"] = nncf.__version__
    # one dataset item is one model input (a batch), hence subset_size counts batches
    return {**settings, "calibration_dataset": nncf.Dataset(batches), "subset_size": len(batches)}


def save_openvino(ctx: BuildContext, model: Any, dst: Path, precision: str) -> None:
    """Save the IR (fp32 weights: OpenVINO would store them fp16 by default) and record what the
    CPU plugin reports once it is compiled the way every consumer compiles it."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    ov.save_model(model, str(dst), compress_to_fp16=False)
    with progress.phase(log, f"compiling the OpenVINO IR ({precision}) for the CPU plugin"):
        compiled, _ = openvino_compile(dst, precision)
    ctx.notes["openvino_version"] = ov.__version__
    ctx.notes["performance_hint"] = str(compiled.get_property(hints.performance_mode))
    ctx.notes["streams"] = int(compiled.get_property(props.num_streams))
    ctx.notes["threads"] = int(compiled.get_property(props.inference_num_threads))
    ctx.notes["inference_precision"] = compiled.get_property(hints.inference_precision).to_string()
    # layers the CPU plugin runs in int8 (the execution graph's runtimePrecision): > 0 only for
    # a quantized IR, so an int8 variant that silently ran float shows 0
    ctx.notes["int8_layers"] = sum(
        op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8")
        for op in compiled.get_runtime_model().get_ordered_ops()
    )
    asked = OPENVINO_PRECISIONS[precision]
    if ctx.notes["inference_precision"] != asked:
        raise BuildFailed(
            f"OpenVINO was asked for {asked} and compiled {ctx.notes['inference_precision']}"
        )


def ir(ctx: BuildContext, dst: Path) -> None:
    """The IR, compiled in the row's precision (fp32 or bf16) to check what the plugin runs."""
    precision = ctx.variant.precision
    if precision == "bf16":
        ctx.notes["native_bf16"] = cpu_has_native_bf16()
    save_openvino(ctx, openvino_ir(ctx), dst, precision)


def nncf_int8(ctx: BuildContext, dst: Path, model: Any = None) -> None:
    """NNCF post-training quantization of the IR (or of `model`, a pruned one's), calibrated on
    the training images, with the settings of `optimize.settings.openvino_int8` (conf/optimize
    says why those); the record keeps the calibration images and int8 layers."""
    import nncf

    quantizer = nncf_quantizer(ctx)
    # NNCF draws its own progress bars (rich), so no clock of ours beside them.
    log.info(
        "NNCF: collecting statistics on %d batches and correcting biases", quantizer["subset_size"]
    )
    quantized = nncf.quantize(openvino_ir(ctx) if model is None else model, **quantizer)
    save_openvino(ctx, quantized, dst, "int8")
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: NNCF inserted no quantizer")


def qdq_int8(ctx: BuildContext, dst: Path) -> None:
    """ONNX Runtime's static QDQ int8 file (`build_ort.qdq_int8`, with the settings of
    `optimize.settings.onnxruntime_int8`: the row says so) converted to an IR: OpenVINO turns
    each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and runs those layers in
    int8. The build fails when none runs in int8."""
    from oipipe.deploy import build_ort

    qdq = dst.with_name("qdq.onnx")
    build_ort.qdq_int8(ctx, qdq)
    try:
        save_openvino(ctx, openvino_ir(ctx, qdq), dst, "int8")
    finally:
        qdq.unlink(missing_ok=True)
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: the QDQ nodes were dropped")


def accuracy_control_int8(ctx: BuildContext, dst: Path) -> None:
    """NNCF's post-training int8 with an accuracy budget (`nncf.quantize_with_accuracy_control`):
    quantized as `openvino_int8` (its settings, the same calibration), then the operations that
    cost the most top-1 on the validation split are put back to floating point, one per
    iteration, until the drop from fp32 is at most `max_drop_pct` points or `max_iterations` have
    run. The validation split alone steers it (never test); the verdict is on val + test as for
    every variant. The record keeps the FakeQuantize nodes left and the images it validated on."""
    import nncf
    import numpy as np
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from oipipe.core.config import path
    from oipipe.measure import evaluation

    s = dict(ctx.settings)
    quantizer = nncf_quantizer(ctx)
    images, labels = evaluation.images(path(ctx.cfg, "prepared"), ["val"], ctx.meta)
    items = [(images[i : i + 1].numpy(), int(labels[i])) for i in range(len(labels))]
    ctx.notes["accuracy_control_images"] = len(items)

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        correct = [float(np.argmax(compiled(x)[0][0]) == y) for x, y in data]
        return float(np.mean(correct)) if correct else 0.0, correct

    log.info(
        "NNCF with accuracy control: at most %.2f points below fp32 on %d validation images",
        s["max_drop_pct"],
        len(items),
    )
    quantized = nncf.quantize_with_accuracy_control(
        openvino_ir(ctx),
        validation_dataset=nncf.Dataset(items, lambda item: item[0]),
        validation_fn=validate,
        max_drop=s["max_drop_pct"] / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        **quantizer,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=s["max_iterations"]
        ),
    )
    ctx.notes["fake_quantize_nodes"] = sum(
        op.get_type_name() == "FakeQuantize" for op in quantized.get_ops()
    )
    save_openvino(ctx, quantized, dst, "int8")
    if ctx.notes["int8_layers"] == 0:
        raise BuildFailed("the compiled IR runs no layer in int8: every quantizer was reverted")
