"""Build functions of the ONNX Runtime variants: the export stage's ONNX file as it is, and
static QDQ int8 of it. Each is `(ctx, dst)`, named by its variant's row in
`oipipe.core.variants`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from oipipe.core.variants import FORMATS
from oipipe.deploy.build import BuildContext
from oipipe.deploy.runtime import META
from oipipe.measure.machine import cpu_flags


def exported_onnx(ctx: BuildContext, dst: Path) -> None:
    # The export stage's ONNX file, verified there against eager; ORT optimises it at load.
    shutil.copyfile(ctx.exported / FORMATS["onnx"].file, dst)


def qdq_int8(ctx: BuildContext, dst: Path) -> None:
    """Static quantization in `optimize.settings.onnxruntime_int8`: by default QDQ, int8 weights
    per channel, uint8 activations (U8S8).

    U8S8 is what ORT's x86 kernels are fastest at on VNNI CPUs (about 2x S8S8: figures in
    benchmarks/results/design_figures.md); on x86 without VNNI it can saturate, hence the note
    in the record.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[torch.Tensor]):
            self.batches, self.seen = batches, 0

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.seen += len(batch)
            return {"images": batch.numpy()}

    s = ctx.settings
    pre = dst.with_name("pre.onnx")
    quant_pre_process(str(ctx.exported / FORMATS["onnx"].file), str(pre))
    reader = Reader(ctx.calibration())
    quantize_static(
        str(pre),
        str(dst),
        reader,
        quant_format=QuantFormat[s["quant_format"]],
        per_channel=s["per_channel"],
        activation_type=QuantType[s["activation_type"]],
        weight_type=QuantType[s["weight_type"]],
    )
    pre.unlink()
    ctx.notes["calibration_images"] = reader.seen
    ctx.notes["vnni"] = bool({"avx512_vnni", "avx_vnni"} & cpu_flags())
    proto = onnx.load(str(dst))
    onnx.helper.set_model_props(proto, {META: json.dumps(ctx.meta, sort_keys=True)})
    onnx.save(proto, str(dst))
