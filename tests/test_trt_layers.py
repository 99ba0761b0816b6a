"""oipipe.deploy.trt_layers: TensorRT engine-inspector layer information parsed from saved samples
(tests/data/README.md says what each stands for), and the PyTorch-fallback check. No GPU needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from oipipe.deploy import trt_layers

DATA = Path(__file__).parent / "data"
FP16 = (DATA / "trt_layer_info_fp16.json").read_text(encoding="utf-8")
MIXED = (DATA / "trt_layer_info_mixed.json").read_text(encoding="utf-8")
NAMES_ONLY = (DATA / "trt_layer_info_names_only.json").read_text(encoding="utf-8")
STEM = "[CONVOLUTION]-[aten_ops.convolution.default]-[convolution] + "


def test_fp16_sample_counts() -> None:
    """Dynamic batch: no format is shown, so the 7 convolutions are known by their Half weights
    and the 4 other layers are unknown."""
    assert trt_layers.layer_precisions(FP16) == {
        "layers": {"fp16": 7, "unknown": 4},
        "convolutions": {"fp16": 7},
    }


def test_mixed_sample_counts() -> None:
    """Static batch: formats shown, read from the output; the FP32 stem and the FP32 output
    reformat count as fp32, the fully connected layer run as a convolution counts as one."""
    assert trt_layers.layer_precisions(MIXED) == {
        "layers": {"fp16": 6, "fp32": 2},
        "convolutions": {"fp16": 3, "fp32": 1},
    }
    reformat = json.loads(MIXED)["Layers"][1]  # FP32 in, FP16 out: counted by what it writes
    assert reformat["LayerType"] == "Reformat" and trt_layers.layer_dtype(reformat) == "fp16"


def test_fp16_check_passes_on_the_fp16_sample() -> None:
    trt_layers.check_fp16(FP16)
    trt_layers.check_fp16(json.loads(FP16))  # parsed JSON as well as text


def test_fp16_check_fails_on_a_float_convolution() -> None:
    with pytest.raises(
        trt_layers.LayerPrecisionError, match=r"runs 1 of 4 convolution layers in another precision"
    ) as e:
        trt_layers.check_fp16(MIXED)
    assert STEM in str(e.value) and "(fp32)" in str(e.value)


def test_fp16_check_fails_when_no_convolution_runs_in_half() -> None:
    """Every convolution in float: an FP32 engine where FP16 was asked for."""
    info = json.loads(FP16)
    for layer in info["Layers"]:
        if "Weights" in layer:
            layer["Weights"]["Type"] = "Float"
    with pytest.raises(trt_layers.LayerPrecisionError, match=r"runs 7 of 7 convolution layers"):
        trt_layers.check_fp16(info)


def test_fp16_check_fails_when_no_convolution_shows_its_type() -> None:
    """Dynamic shapes hide the formats; without weights types nothing confirms fp16."""
    info = json.loads(FP16)
    for layer in info["Layers"]:
        layer.pop("Weights", None)
    with pytest.raises(trt_layers.LayerPrecisionError, match=r"none of the engine's 7 conv"):
        trt_layers.check_fp16(info)


def test_fp16_check_fails_without_a_convolution() -> None:
    info = json.loads(FP16)
    info["Layers"] = [x for x in info["Layers"] if not trt_layers.is_convolution(x)]
    with pytest.raises(trt_layers.LayerPrecisionError, match=r"no convolution layer.*CaskPooling"):
        trt_layers.check_fp16(info)


@pytest.mark.parametrize("parse", [trt_layers.layer_precisions, trt_layers.check_fp16])
def test_names_only_layer_information_is_refused(parse) -> None:
    """What an engine built outside a Debugger reports (ProfilingVerbosity LAYER_NAMES_ONLY)."""
    with pytest.raises(
        ValueError,
        match=r"only layer names \(11 of 11 layers.*"
        r"ProfilingVerbosity\.DETAILED.*save_layer_info=True",
    ):
        parse(NAMES_ONLY)


def test_other_json_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not TensorRT engine-inspector JSON.*\['Bindings'\]"):
        trt_layers.layer_precisions({"Bindings": ["x"]})


@pytest.mark.parametrize(
    ("description", "dtype"),
    [
        ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Row major linear FP32", "fp32"),
        ("Row major linear FP16 format (kLINEAR)", "fp16"),
        ("Thirty-two wide channel vectorized row major Int8 format.", "int8"),
        ("Channel major BFloat16 format where channel % 8 == 0", "bf16"),
        ("Half", "fp16"),
        ("Float", "fp32"),
        ("Int32", "int32"),
        ("N/A due to dynamic shapes", None),
        ("Unknown format", None),
        (None, None),
    ],
)
def test_tensor_dtype(description: str | None, dtype: str | None) -> None:
    assert trt_layers.tensor_dtype(description) == dtype


def test_layer_info_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Debugger\(save_layer_info=True"):
        trt_layers.layer_info_file(tmp_path)
    (tmp_path / "engine_layer_info.json").write_text(FP16, encoding="utf-8")
    assert trt_layers.layer_info_file(tmp_path) == tmp_path / "engine_layer_info.json"


class _Partitioned(nn.Module):
    """Shaped like Torch-TensorRT's output: an engine submodule and a piece left to PyTorch."""

    def __init__(self, fallback: bool):
        super().__init__()
        self._run_on_acc_0 = nn.Linear(4, 4)
        if fallback:
            self._run_on_gpu_1 = nn.ReLU()
        self.fallback = fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_on_acc_0(x)
        return self._run_on_gpu_1(x) if self.fallback else x


@pytest.mark.parametrize("fallback", [True, False])
def test_submodules_of_a_compiled_graph(fallback: bool) -> None:
    gm = torch.fx.symbolic_trace(_Partitioned(fallback))
    assert trt_layers.tensorrt_submodules(gm) == ["_run_on_acc_0"]
    assert trt_layers.torch_fallback_submodules(gm) == (["_run_on_gpu_1"] if fallback else [])
