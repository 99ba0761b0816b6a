"""The export stage's writers, one per format, each `(model, example, dst, meta_json, export
conf)` into a temp file that is then moved into place; named by the format's row in
`oipipe.core.variants.FORMATS`."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from oipipe.core.errors import StageError
from oipipe.core.files import atomic_open

META_FILE = "meta.json"


def torchscript(
    model: nn.Module, example: torch.Tensor, dst: Path, meta: str, ex: DictConfig
) -> None:
    # TorchScript is deprecated upstream but still what many deployment targets load; trace
    # (not script) captures the eval-mode graph, freeze folds weights and batch norms in.
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, example))
    with atomic_open(dst, "wb") as f:
        torch.jit.save(frozen, f, _extra_files={META_FILE: meta})


def exported_program(
    model: nn.Module, example: torch.Tensor, dst: Path, meta: str, ex: DictConfig
) -> None:
    batch = torch.export.Dim("batch", min=1, max=ex.max_batch)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    with atomic_open(dst, "wb") as f:
        torch.export.save(ep, f, extra_files={META_FILE: meta})


def onnx(model: nn.Module, example: torch.Tensor, dst: Path, meta: str, ex: DictConfig) -> None:
    import onnx as onnx_lib

    batch = torch.export.Dim("batch", min=1, max=ex.max_batch)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        opset_version=ex.onnx_opset,
        dynamo=True,
    )
    if program is None:  # only the TorchScript exporter (dynamo=False) returns nothing
        raise StageError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got < ex.onnx_opset:
        raise StageError(
            f"ONNX export produced opset {got}, below export.onnx_opset={ex.onnx_opset}"
        )
    onnx_lib.helper.set_model_props(proto, {META_FILE: meta})
    with atomic_open(dst, "wb") as f:
        f.write(proto.SerializeToString())
